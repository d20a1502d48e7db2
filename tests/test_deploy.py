"""emu.deploy without Docker: the compose file and swarm stack written for a topology (sizes, cpusets,
mounts, keys, placement), the repository's docker-compose.yml being exactly `emu compose`'s output for
topology/multihost.yaml, and the deployment commands' refusals of bad input (exit 2, nothing started).
The containers themselves run in tests/test_docker.py and tests/test_docker_deploy.py."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from emu import cli
from emu.deploy import commands, compose, engine, swarm
from emu.deploy.plan import SHM_ROUND, cpuset_text, make_plan
from emu.errors import BadInputError
from emu.run.coordinator import RUN_SHM_BYTES, host_shm_bytes
from emu.topology.file import load_topology

ROOT = Path(__file__).resolve().parents[1]
MULTIHOST = ROOT / "topology" / "multihost.yaml"


def _write(tmp_path: Path, text: str, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


TWO_HOSTS = """\
    name: two
    hosts:
      a:
        cpus: 2
        pages: 8192
        devices: {eth0: {ifindex: 2, xdp: {program: "emu.programs:l2fwd", params: {egress: eth1}}},
                  eth1: {ifindex: 3, xdp_xmit: true}}
      b:
        cpus: 3
        cpu_affinity: [5, 6, 9]
        pages: 20000
        placement: {node.labels.emu: rack2, node.role: worker}
        devices: {eth0: {ifindex: 2, xdp: {program: "myprog:fwd"}}, eth1: {ifindex: 3, xdp_xmit: true}}
    traffic:
      gen0: {generate: {count: 500}}
      sink0: {}
    links:
      - endpoints: [gen0, "a:eth0"]
      - endpoints: ["a:eth1", "b:eth0"]
      - endpoints: ["b:eth1", sink0]
    """

PROG = """\
    from emu.programs import l2fwd

    def fwd(ctx, params):
        return l2fwd(ctx, {"egress": "eth1"})
    """


@pytest.fixture
def two(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """TWO_HOSTS, its program module `myprog` beside it (imported afresh: each test has its own file)."""
    _write(tmp_path, PROG, "myprog.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "myprog", raising=False)
    yield load_topology(_write(tmp_path, TWO_HOSTS))
    sys.modules.pop("myprog", None)


def test_repository_compose_file_is_emu_compose_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """docker-compose.yml is `emu compose topology/multihost.yaml` (its header names the exact command):
    the two cannot drift apart."""
    monkeypatch.chdir(ROOT)
    text = (ROOT / "docker-compose.yml").read_text()
    line = next(x for x in text.splitlines() if x.startswith("# Written by `"))
    argv = line.split("`")[1].split()[1:]
    args = cli.build_parser().parse_args(argv)
    assert args.topology == "topology/multihost.yaml" and args.output == "docker-compose.yml"
    assert commands.compose_text(args)[0] == text, f"docker-compose.yml is stale: run `{' '.join(argv)}` again"


def test_compose_file_for_multihost() -> None:
    plan = make_plan(load_topology(MULTIHOST), cores=2)
    doc = yaml.safe_load(compose.render(plan, str(ROOT), count=123))
    svc = doc["services"]
    assert list(svc) == ["coordinator", "h1", "h2", "h3"]
    assert [svc[h]["cpuset"] for h in ("h1", "h2", "h3")] == ["${EMU_CPUS_H1:-0}", "${EMU_CPUS_H2:-1}",
                                                                "${EMU_CPUS_H3:-0}"]
    assert svc["coordinator"]["cpuset"] == "${EMU_CPUS_COORDINATOR:-0-1}"
    coord = svc["coordinator"]["command"]
    assert coord[:3] == ["emu", "coordinator", "/srv/emu/topology/multihost.yaml"]
    assert coord[coord.index("--count") + 1] == "${EMU_COUNT:-123}"
    assert svc["coordinator"]["volumes"] == ["./topology/multihost.yaml:/srv/emu/topology/multihost.yaml:ro"]
    for h in ("h1", "h2", "h3"):
        s = svc[h]
        assert s["depends_on"] == {"coordinator": {"condition": "service_healthy"}}
        assert s["command"][:3] == ["emu", "host", h] and "tcp://coordinator:7700" in s["command"]
        # control on `emu`, cables on `links` (hosts only), where peers reach the host as hN.links
        assert s["networks"] == {"emu": {}, "links": {"aliases": [f"{h}.links"]}}
        assert s["command"][s["command"].index("--advertise") + 1] == f"{h}.links"
        assert s["pull_policy"] == "never" and s["init"] is True and s["restart"] == "no"
        assert "ports" not in s and "healthcheck" in s
    assert doc["networks"] == {"emu": {"internal": True}, "links": {"internal": True}}
    assert svc["coordinator"]["networks"] == ["emu"]


def test_shm_size_covers_the_host_with_margin(two) -> None:
    plan = make_plan(two, cores=4)
    for h in plan.hosts:
        need = host_shm_bytes(two.hosts[h.name]) + RUN_SHM_BYTES
        assert need * 1.5 <= h.shm_bytes < need * 1.5 + SHM_ROUND and h.shm_bytes % SHM_ROUND == 0
    a, b = plan.hosts
    assert b.shm_bytes > a.shm_bytes  # more pages, more CPUs and rings


def test_cpusets_from_cpus_and_affinity(two) -> None:
    a, b = make_plan(two, cores=4).hosts
    assert a.cpuset == "0-1"  # two CPUs, the first cores
    assert b.cpuset == "1-2"  # cpu_affinity 5, 6, 9 on 4 cores: 1, 2, 1
    a, b = make_plan(two, cores=16).hosts
    assert (a.cpuset, b.cpuset) == ("0-1", "5-6,9")
    assert cpuset_text((0, 2, 3, 4, 7)) == "0,2-4,7"


def test_program_modules_outside_the_image_are_mounted(two, tmp_path: Path) -> None:
    plan = make_plan(two, cores=2)
    doc = yaml.safe_load(compose.render(plan, str(tmp_path)))
    b = doc["services"]["b"]
    assert b["volumes"] == ["./myprog.py:/srv/emu/programs/myprog.py:ro"]
    assert b["environment"] == {"PYTHONPATH": "/srv/emu/programs"}
    # the coordinator validates the topology, so it imports the program too
    assert doc["services"]["coordinator"]["volumes"] == ["./t.yaml:/srv/emu/topology/t.yaml:ro",
                                                         "./myprog.py:/srv/emu/programs/myprog.py:ro"]
    assert doc["services"]["coordinator"]["environment"] == {"PYTHONPATH": "/srv/emu/programs"}
    # a file elsewhere is named by its absolute path
    doc = yaml.safe_load(compose.render(plan, str(ROOT)))
    assert doc["services"]["b"]["volumes"] == [f"{tmp_path}/myprog.py:/srv/emu/programs/myprog.py:ro"]


def test_compose_keys_are_mounted_and_passed(two, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    doc = yaml.safe_load(compose.render(make_plan(two, cores=2), str(tmp_path), keys_dir=str(keys)))
    for name, svc in doc["services"].items():
        assert "./keys:/keys:ro" in svc["volumes"], name
        assert svc["command"][svc["command"].index("--keys") + 1] == "/keys"


def test_swarm_stack(two, tmp_path: Path) -> None:
    plan = make_plan(two, cores=2)
    doc = yaml.safe_load(swarm.render(plan, str(tmp_path), "pagepool-emu:local", count=40,
                                      keys_dir=str(tmp_path / "keys")))
    svc = doc["services"]
    assert doc["networks"]["emu"] == doc["networks"]["links"] == {"driver": "overlay", "internal": True,
                                                                   "attachable": True}
    for name, s in svc.items():
        assert s["deploy"]["restart_policy"] == {"condition": "none"}, name
        assert "depends_on" not in s and "cpuset" not in s and "shm_size" not in s and "ports" not in s
        assert s["image"] == "pagepool-emu:local"
        assert [x["target"] for x in s["secrets"]] == ["emu.key", "emu.key_secret"]
        assert s["command"][s["command"].index("--keys") + 1] == "/run/secrets"
        assert all(x["uid"] == "10001" for x in s["secrets"])
    assert svc["b"]["deploy"]["placement"] == {"constraints": ["node.labels.emu == rack2", "node.role == worker"]}
    assert "placement" not in svc["a"]["deploy"]
    for h in plan.hosts:
        assert svc[h.name]["volumes"] == [{"type": "tmpfs", "target": "/dev/shm", "tmpfs": {"size": h.shm_bytes}}]
    assert [c["target"] for c in svc["coordinator"]["configs"]] == ["/srv/emu/topology/t.yaml",
                                                                    "/srv/emu/programs/myprog.py"]
    assert svc["b"]["configs"][0]["target"] == "/srv/emu/programs/myprog.py"
    assert doc["configs"]["f_t_yaml"] == {"file": "./t.yaml"}
    assert doc["secrets"]["emu_key_secret"] == {"file": "./keys/emu.key_secret"}
    cmd = svc["coordinator"]["command"]
    assert cmd[cmd.index("--count") + 1] == "${EMU_COUNT:-40}" and cmd[-2:] == ["--json", "-"]


def test_placement_key_is_validated(tmp_path: Path) -> None:
    text = TWO_HOSTS.replace("node.labels.emu: rack2", "node.label.emu: rack2").replace("myprog:fwd",
                                                                                     "emu.programs:xdp_drop")
    with pytest.raises(BadInputError, match=r"t\.yaml:\d+: b: 'placement' key 'node.label.emu'"):
        load_topology(_write(tmp_path, text))
    text = TWO_HOSTS.replace("node.labels.emu: rack2", "node.labels.emu: [1]").replace("myprog:fwd",
                                                                                    "emu.programs:xdp_drop")
    with pytest.raises(BadInputError, match="must be a non-empty string"):
        load_topology(_write(tmp_path, text))


def test_host_named_coordinator_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, """\
        name: c
        hosts:
          coordinator: {cpus: 1, devices: {eth0: {ifindex: 2}}}
        """)
    with pytest.raises(BadInputError, match="clashes with the coordinator"):
        make_plan(load_topology(path))


def test_deploy_refuses_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Bad names and unknown deployments: exit 2 with a message, no docker command run."""
    monkeypatch.setenv("EMU_DEPLOY_DIR", str(tmp_path / "state"))
    assert cli.main(["deploy", str(MULTIHOST), "--name", "Bad Name"]) == 2
    assert "deployment name 'Bad Name'" in capsys.readouterr().err
    assert cli.main(["destroy", "nosuch"]) == 2
    assert "no deployment 'nosuch'" in capsys.readouterr().err
    assert cli.main(["ps", "nosuch"]) == 2
    assert cli.main(["ps"]) == 0
    assert "no deployments" in capsys.readouterr().out
    assert cli.main(["compose", str(MULTIHOST), "-o", str(tmp_path / "no" / "x.yml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "state").exists() or not os.listdir(tmp_path / "state")


def test_deployment_state_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMU_DEPLOY_DIR", str(tmp_path))
    d = engine.Deployment("x1", "swarm", "multihost", str(MULTIHOST), ["h1", "h2"], "pagepool-emu:local", 1.0)
    d.dir.mkdir()
    d.save()
    assert engine.Deployment.load("x1") == d
    assert engine.all_names() == ["x1"]
    assert d.file.name == "stack.yml"


def test_compose_cli_writes_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.yml"
    assert cli.main(["compose", str(MULTIHOST), "--cores", "2", "--duration", "5", "-o", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    cmd = doc["services"]["coordinator"]["command"]
    assert cmd[cmd.index("--duration") + 1] == "5" and "--count" not in cmd
    assert "wrote" in capsys.readouterr().out
    assert isinstance(commands.compose_text(argparse.Namespace(
        topology=str(MULTIHOST), cores=None, build_context=None, keys=None, count=None, duration=None,
        output="-"))[0], str)


def test_link_watch_reports_a_cut_and_its_heal() -> None:
    """The coordinator's partition watch on one direction of a cable between hosts: frames sent but
    none taken for PARTITION_AFTER seconds is a cut; frames taken again is the heal."""
    from emu.cluster.cluster import PARTITION_AFTER, LinkWatch

    w = LinkWatch("h1:eth1 -> h2:eth0", "h1/eth1", "h2/eth0", ("h1", "h2"))

    def rows(sent: int, got: int) -> dict[str, dict[str, int]]:
        return {"h1/eth1": {"tx_packets": sent + 7, "tx_dropped": 5, "link_lost": 2}, "h2/eth0": {"rx_packets": got}}

    t = 100.0
    assert w.check(rows(0, 0), t) is None
    assert w.check(rows(500, 400), t + 0.25) is None  # moving
    assert w.check(rows(900, 400), t + 0.25 + PARTITION_AFTER / 2) is None  # stalled, not for long yet
    assert w.check(rows(1000, 400), t + 0.3 + PARTITION_AFTER) == "cut"
    assert w.waiting == 600 and w.cut == t + 0.25
    assert w.check(rows(1000, 400), t + 20) is None  # still cut: said once
    assert w.check(rows(1000, 1000), t + 21) == "healed"
    assert w.history == [{"link": "h1:eth1 -> h2:eth0", "cut_s": 100.25, "healed_s": 121.0, "seconds": 20.75}]
    # idle (nothing waits) is no partition, however long
    assert w.check(rows(1000, 1000), t + 100) is None and w.cut is None


def test_deployment_files_are_copies(two, tmp_path: Path) -> None:
    """A deployment reads copies of the topology, its program modules and keys (the keys owned by the
    image's user when run as root), so editing the originals changes no running deployment."""
    from emu.net.security import generate_keys

    keys = tmp_path / "keys"
    generate_keys(str(keys))
    plan = make_plan(two, cores=2)
    files = tmp_path / "dep" / "files"
    if os.geteuid() != 0:
        with pytest.raises(BadInputError, match="uid 10001"):
            engine._copy_files(plan, files, str(keys))
        return
    copied, keys_copy = engine._copy_files(plan, files, str(keys))
    assert [m.source for m in copied.mounts] == [str(files / "topology" / "t.yaml")]
    assert [m.source for m in copied.program_mounts] == [str(files / "programs" / "myprog.py")]
    assert (files / "topology" / "t.yaml").read_text() == (tmp_path / "t.yaml").read_text()
    assert keys_copy == str(files / "keys")
    for f in ("emu.key", "emu.key_secret"):
        st = (files / "keys" / f).stat()
        assert st.st_uid == 10001
    assert (files / "keys" / "emu.key_secret").stat().st_mode & 0o077 == 0  # the secret stays private


def test_deploy_refuses_an_existing_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EMU_DEPLOY_DIR", str(tmp_path))
    (tmp_path / "lab1").mkdir()
    assert cli.main(["deploy", str(MULTIHOST), "--name", "lab1"]) == 2
    assert "deployment 'lab1' exists already" in capsys.readouterr().err
