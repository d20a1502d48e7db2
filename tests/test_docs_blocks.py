"""The documentation's examples work as written: every bundled topology validates, and every fenced block of
README.md, topology/README.md, docs/*.md and bench/README.md that is meant to run is checked.

* ``emu ...`` command lines (at the start of a line, or after ``$ ``) parse with the CLI's own parser, and the
  files they name exist and load: a topology is validated as ``emu validate`` does (``--capture`` devices
  included), an experiment file as ``emu sweep`` checks it, an eBPF object by the loader.  A synopsis line
  (placeholders such as ``NAME``, ``[--json]``, ``a|b``) is checked for its subcommand and its flags.
* YAML blocks: a whole topology is validated; a fragment (``links:``, ``traffic:``, ``xdp:``) is put into the
  bundled topology it belongs to and that is validated; an experiment file is loaded with its grid.  A YAML
  block of another kind fails the test until it gets a base here.
* Scripts (``./x.sh``, ``scripts/x.sh``, ``python bench/x.py``, ``python -m mod``) exist, and each
  ``--flag`` given to a Python script appears in its source.
* The Python example of docs/ebpf.md runs, and the clang recipe of docs/ebpf.md builds an object the loader
  takes (where clang is installed).

`test_a_broken_snippet_fails` feeds the checker broken blocks, so that the checks can fail.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from procs import ROOT

from emu.cli import build_parser
from emu.errors import BadInputError
from emu.topology.file import load_topology, validate_topology_text

DOCS = [ROOT / "README.md", ROOT / "topology" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "bench" / "README.md"]

# Names the docs use for files that are the reader's own (an example of an error, a placeholder).
ILLUSTRATIVE = {"bad.yaml", "lab.yaml", "t.yaml", "prog.c", "prog.o"}
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.[a-z]+)?$")
# The bundled topology each kind of YAML fragment belongs to, and where in it the fragment goes.
FRAGMENT_BASES = {
    "links": ("multihost.yaml", ()),
    "traffic": ("replay.yaml", ()),
    "xdp": ("l2fwd.yaml", ("hosts", "h1", "devices", "eth0")),
}


@dataclass
class Block:
    path: Path
    line: int  # of the block's first line, 1-based
    lang: str
    lines: list[str]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path}:{self.line}"


def blocks_of(path: Path, text: str | None = None) -> list[Block]:
    """The fenced blocks of a Markdown file (indented fences included)."""
    lines = (path.read_text() if text is None else text).splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if m:
            start = i + 1
            i += 1
            while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
                i += 1
            assert i < len(lines), f"{path}:{start}: unterminated code block"
            indent = len(m.group(1))  # a fence indented in a list item: its lines are too
            out.append(Block(path, start + 1, m.group(2), [t[indent:] for t in lines[start:i]]))
        i += 1
    return out


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks_of(doc)]


# -- commands ---------------------------------------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _parse(tokens: list[str], where: str) -> argparse.Namespace:
    """The CLI's own parse of a command line; AssertionError with argparse's message if it refuses it."""
    parser = build_parser()
    refused: list[str] = []

    def error(message: str) -> None:
        refused.append(message)
        raise SystemExit(2)

    for p in (parser, *_subparsers(parser).values()):
        p.error = error  # type: ignore[method-assign]
    try:
        return parser.parse_args(tokens)
    except SystemExit as e:
        raise AssertionError(f"{where}: emu {' '.join(tokens)}: {refused[-1] if refused else e.code}") from None


def _is_synopsis(tokens: list[str]) -> bool:
    return any("[" in t or "]" in t or "|" in t or t == "..." or PLACEHOLDER.match(t) for t in tokens)


def check_synopsis(tokens: list[str], where: str) -> None:
    """A synopsis names a subcommand and flags it has."""
    subs = _subparsers(build_parser())
    assert tokens and tokens[0] in subs, f"{where}: emu {' '.join(tokens)}: no subcommand {tokens[:1]}"
    options = {s for a in subs[tokens[0]]._actions for s in a.option_strings}
    for t in tokens[1:]:
        for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", t):
            assert flag in options, f"{where}: emu {' '.join(tokens)}: `emu {tokens[0]}` has no option {flag}"


def _topology(path: str, where: str):
    file = ROOT / path
    assert file.is_file(), f"{where}: {path}: no such file"
    return load_topology(file)


def check_command(line: str, where: str) -> None:
    """One documented ``emu`` command line: it parses, and what it names exists and is valid."""
    tokens = shlex.split(line, comments=True)
    assert tokens[0] == "emu", line
    tokens = tokens[1:]
    if _is_synopsis(tokens):
        check_synopsis(tokens, where)
        return
    args = _parse(tokens, where)
    command = args.command
    if command in ("run", "validate", "capture", "coordinator", "compose", "deploy"):
        if Path(args.topology).name in ILLUSTRATIVE:
            return
        topo = _topology(args.topology, where)
        if command in ("run", "coordinator") and (args.capture or args.snaplen):
            from emu.cli import _with_capture
            _with_capture(topo, args.capture, None, args.snaplen)
        if command == "capture":
            from emu.topology.model import CaptureConfig
            CaptureConfig.parse_device(args.device, topo.hosts)
    elif command == "sweep":
        from emu.sweep.spec import load_spec
        assert (ROOT / args.spec).is_file(), f"{where}: {args.spec}: no such file"
        load_spec(str(ROOT / args.spec))
    elif command == "inspect":
        if Path(args.object).name in ILLUSTRATIVE:
            return
        obj = ROOT / args.object
        if not obj.exists() and obj.with_suffix(".c").exists():
            pytest.skip(f"{args.object} is a build product (scripts/build-bpf.sh)")
        from emu.ebpf.elf import load_object
        load_object(obj)


def check_script(line: str, where: str) -> None:
    """``./x.sh``, ``scripts/x.sh``, ``python bench/x.py [--flag]``, ``python -m mod``: they exist."""
    tokens = shlex.split(line, comments=True)
    tokens = [t for t in tokens if not re.match(r"^[A-Z_]+=", t)]  # VAR=value prefixes
    if not tokens:
        return
    if tokens[0].startswith(("./", "scripts/")):
        script = ROOT / tokens[0]
        assert script.is_file() and os.access(script, os.X_OK), f"{where}: {tokens[0]}: no such executable"
    elif tokens[0] in ("python", "python3", ".venv/bin/python"):
        if tokens[1] == "-m":
            module = tokens[2]
            if module == "pytest":
                return
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file() or \
                (ROOT / module.replace(".", "/") / "__main__.py").is_file(), f"{where}: no module {module}"
            return
        script = ROOT / tokens[1]
        assert script.is_file(), f"{where}: {tokens[1]}: no such file"
        source = script.read_text()
        for t in tokens[2:]:
            if t.startswith("--"):
                assert f'"{t}"' in source or f"'{t}'" in source, f"{where}: {tokens[1]} has no option {t}"


def command_lines(block: Block) -> list[tuple[str, str]]:
    """(kind, line) of a block's lines meant to be typed: ``emu`` commands and scripts."""
    out = []
    for i, text in enumerate(block.lines):
        text = text.removeprefix("$ ")
        known = len(out)
        if text.startswith("emu "):
            parts = re.split(r"\s+/\s+(?=emu )", shlex.join(shlex.split(text, comments=True)))
            # "emu coordinator / emu host / emu keys": several subcommands named on one line
            out += [("emu", p) if len(parts) == 1 else ("synopsis", p) for p in parts]
        elif re.match(r"^(\./|scripts/|(python3?|\.venv/bin/python) |[A-Z_]+=\S* (scripts/|\./))", text):
            out.append(("script", text))
        # continuation lines ("\" at the end) carry more options of the same command: not checked
        if text.endswith("\\") and len(out) > known:
            out[-1] = (out[-1][0], out[-1][1].rstrip("\\") + " " + block.lines[i + 1].strip())
    return out


# -- YAML blocks ---------------------------------------------------------------------------------------------

def _workdir(tmp: Path) -> Path:
    """tmp/topology (the bundled files' pcap/ and objects reachable as from topology/) and tmp/experiments."""
    (tmp / "topology").mkdir(exist_ok=True)
    for name in ("pcap",):
        link = tmp / "topology" / name
        if not link.exists():
            link.symlink_to(ROOT / "topology" / name)
    if not (tmp / "emu").exists():
        (tmp / "emu").symlink_to(ROOT / "emu")
    (tmp / "experiments").mkdir(exist_ok=True)
    return tmp


def _line_map(block: Block) -> str:
    return f"{block.where} (line N of the message is the block's line N)"


def check_yaml(block: Block, tmp: Path) -> None:
    text = "\n".join(block.lines) + "\n"
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict), f"{block.where}: a YAML block that is not a mapping"
    work = _workdir(tmp)
    if {"topology", "grid"} <= doc.keys():  # an experiment file, placed where its relative paths hold
        from emu.sweep.spec import load_spec
        for name in ("topology",):
            if not (work / name).is_symlink():
                shutil.rmtree(work / name)
                (work / name).symlink_to(ROOT / name)
        spec = work / "experiments" / "doc-block.yaml"
        spec.write_text(text)
        load_spec(str(spec))
        return
    if {"name", "hosts"} <= doc.keys():
        validate_topology_text(text, str(work / "topology" / "doc-block.yaml"))
        return
    kinds = [k for k in FRAGMENT_BASES if set(doc) == {k}]
    assert kinds, (f"{block.where}: a YAML block with keys {sorted(doc)}: neither a topology nor an experiment "
                   f"file, and no bundled topology to try it in (FRAGMENT_BASES in {Path(__file__).name})")
    base_name, at = FRAGMENT_BASES[kinds[0]]
    base = yaml.safe_load((ROOT / "topology" / base_name).read_text())
    node = base
    for key in at:
        node = node[key]
    key = kinds[0]
    if key == "links":  # replace the bundled link between the same endpoints, or add one
        for link in doc["links"]:
            ends = set(link["endpoints"])
            node["links"] = [x for x in node["links"] if set(x["endpoints"]) != ends] + [link]
    elif key == "traffic":
        node["traffic"].update(doc["traffic"])
    else:
        node[key] = doc[key]
    validate_topology_text(yaml.safe_dump(base, sort_keys=False), str(work / "topology" / f"doc-{base_name}"))


def check_block(block: Block, tmp: Path) -> int:
    """Check one block; the number of checks made (0: a block of output, a diagram)."""
    if block.lang == "yaml":
        check_yaml(block, tmp)
        return 1
    if block.lang == "python":
        check_python(block, tmp)
        return 1
    n = 0
    for kind, line in command_lines(block):
        if kind == "synopsis":
            check_synopsis(shlex.split(line)[1:], block.where)
        else:
            (check_command if kind == "emu" else check_script)(line, block.where)
        n += 1
    return n


def module_name(block: Block) -> str | None:
    """``myprog`` for a Python block that starts ``# myprog.py``: a module the docs tell the reader to write."""
    m = re.match(r"^# (\w+)\.py\s*$", block.lines[0]) if block.lang == "python" and block.lines else None
    return m.group(1) if m else None


def check_python(block: Block, tmp: Path) -> None:
    if module_name(block):  # a module of the reader's: it imports and defines what it says
        exec(compile("\n".join(block.lines) + "\n", block.where, "exec"), {"__name__": module_name(block)})
        return
    pytest.importorskip("emu.ebpf._engine", reason="the eBPF engine is not built")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        exec(compile("\n".join(block.lines) + "\n", block.where, "exec"), {"__name__": "doc_block"})
    finally:
        os.chdir(cwd)


# -- tests ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "topology").glob("*.yaml")))
def test_every_bundled_topology_validates(name: str) -> None:
    topo = load_topology(ROOT / "topology" / name)
    assert topo.name == Path(name).stem


BLOCKS = [b for b in all_blocks()]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_documented_block(block: Block, tmp_path: Path) -> None:
    check_block(block, tmp_path)


def test_the_checks_cover_every_doc_and_bundled_topology() -> None:
    """Every Markdown file of docs/ is read, every bundled topology is named by some documented command,
    and the commands of README.md are there to check (a parser that found none would pass vacuously)."""
    assert {p.name for p in (ROOT / "docs").glob("*.md")} <= {p.name for p in DOCS}
    lines = [line for b in BLOCKS for kind, line in command_lines(b) if kind == "emu"]
    readme = [line for b in BLOCKS if b.path.name == "README.md" and b.path.parent == ROOT
              for kind, line in command_lines(b) if kind == "emu"]
    assert len(readme) >= 20, readme
    named = " ".join(lines) + " ".join((ROOT / "topology" / "README.md").read_text().split())
    for f in (ROOT / "topology").glob("*.yaml"):
        assert f"{f.name}" in named, f"topology/{f.name} appears in no documented command or table"


BROKEN = {
    "unknown flag": "```\nemu run topology/l2fwd.yaml --cuont 10\n```\n",
    "missing topology": "```\nemu run topology/no-such.yaml --count 10\n```\n",
    "invalid capture device": "```\nemu run topology/l2fwd.yaml --capture h1:eth9\n```\n",
    "capture of a missing device": "```\nemu capture topology/l2fwd.yaml h9:eth1 -n 1000\n```\n",
    "synopsis with an unknown flag": "```\nemu pools [--jsn] [RUN]\n```\n",
    "unknown subcommand": "```\nemu poolz\n```\n",
    "missing spec": "```\nemu sweep experiments/none.yaml --out /tmp/x\n```\n",
    "missing script": "```\nscripts/no-such.sh up\n```\n",
    "unknown script flag": "```\npython bench/run.py --quik\n```\n",
    "invalid topology": "```yaml\nname: x\nhosts:\n  h1: {cpus: 0, devices: {eth0: {ifindex: 1}}}\n```\n",
    "invalid link fragment": "```yaml\nlinks:\n  - endpoints: [\"h1:eth1\", \"h2:eth0\"]\n    delay: 5mbit\n```\n",
    "invalid xdp fragment": "```yaml\nxdp:\n  program: \"emu.programs:l2fwd\"\n  params: {egress: eth9}\n```\n",
    "unknown fragment": "```yaml\nhostz: {}\n```\n",
    "broken experiment": "```yaml\ntopology: ../topology/l2fwd.yaml\ngrid:\n  hosts.h1.pool.no_such: [1]\n```\n",
    "python that raises": "```python\nPath('x')\n```\n",
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_snippet_fails(case: str, tmp_path: Path) -> None:
    if case == "python that raises":
        pytest.importorskip("emu.ebpf._engine", reason="the eBPF engine is not built")
    (block,) = blocks_of(tmp_path / "doc.md", BROKEN[case])
    with pytest.raises((AssertionError, ValueError, NameError, OSError, BadInputError)):
        check_block(block, tmp_path)


def test_the_ebpf_build_recipe_builds_an_object_the_loader_takes(tmp_path: Path) -> None:
    """docs/ebpf.md's clang command line, word for word, on a bundled C program."""
    clang = shutil.which("clang")
    if clang is None or not Path("/usr/include/bpf/bpf_helpers.h").exists():
        pytest.skip("clang or libbpf-dev is not installed")
    (block,) = [b for b in blocks_of(ROOT / "docs" / "ebpf.md") if b.lines and b.lines[0].startswith("clang ")]
    command = block.lines[0]
    assert command.endswith("-c prog.c -o prog.o"), command
    src = ROOT / "emu" / "programs" / "bpf"
    for f in ("xdp_drop.c", "xdp_common.h"):
        shutil.copy(src / f, tmp_path / f)
    (tmp_path / "prog.c").write_text((tmp_path / "xdp_drop.c").read_text())
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    if done.returncode and "-mcpu=v" in done.stderr:
        pytest.skip(f"this clang does not take the recipe's -mcpu: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr
    from emu.ebpf.elf import load_object
    obj = load_object(tmp_path / "prog.o")
    assert "xdp_drop" in obj.programs


def test_the_readme_python_program_runs_as_the_readme_says(tmp_path: Path) -> None:
    """README's program module, written where the reader would, named by the topology key the README gives
    and run with the README's PYTHONPATH: it validates, every frame comes back (XDP_TX), its map counts them."""
    import json
    import sys

    readme = ROOT / "README.md"
    (block,) = [b for b in blocks_of(readme) if module_name(b)]
    name = module_name(block)
    (tmp_path / f"{name}.py").write_text("\n".join(block.lines) + "\n")
    m = re.search(r"`xdp: (\{program: \"" + name + r":\w+\".*?\})`", readme.read_text())
    assert m, f"README names no program of {name}.py in an xdp key"
    xdp = m.group(1)
    topo = tmp_path / "my.yaml"
    topo.write_text(f"""name: my
hosts:
  h1:
    cpus: 1
    devices:
      eth0: {{ifindex: 2, xdp: {xdp}}}
traffic:
  t0: {{generate: {{count: 2000, pkt_size: 64}}}}
links:
  - endpoints: [t0, "h1:eth0"]
""")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    # (not run from tmp_path: `python -m` would put the current directory on sys.path, as `emu` does not)
    done = subprocess.run([sys.executable, "-m", "emu.cli", "run", str(topo), "--json", str(tmp_path / "r.json"),
                           "-q"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["traffic"]["generated"] == r["traffic"]["delivered"] == 2000 and r["traffic"]["unaccounted"] == 0
    assert r["maps"]["h1:eth0"]["seen"]["entries"]["0"]["sum"] == 2000
    # Without the module's directory on PYTHONPATH the error says what to do.
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "emu.cli", "validate", str(topo)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "my.yaml:6:" in done.stderr and "PYTHONPATH" in done.stderr, done.stderr
