"""A run on one machine: how it starts, supervises and reports its processes.

`coordinator` (`Run`, from shared memory and processes to teardown and reclaim), `launch` and
`forkserver` (starting workers from a fork server), `process` (what every worker process shares: its
`ProcSpec`, pinning, channels, liveness, last words), `procname` (process titles), `stats` (the stats
segment's layout) and `report` (interval lines, the final summary, the JSON report).  The processes
themselves are the `workers` package, which this one starts and which imports it.
"""
