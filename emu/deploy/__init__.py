"""Emulated topologies as containers: `plan` (what each container needs: ``/dev/shm``, cpuset, files),
`compose` (a Docker Compose file), `swarm` (a Docker Swarm stack), `docker` (the Docker CLI), `engine`
(named deployments: deploy, destroy, ps) and `commands` (the ``emu`` subcommands)."""
