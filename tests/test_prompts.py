"""Keep agent-prompts/ and the READMEs true.

Static checks (fast): every make target they name resolves with `make -n` and gets only variables the
Makefile reads; every script they name exists and answers `--help`; every AR_* / AUTORESEARCH_* /
SKY_* / VESSLCTL_* variable they name is read by the project's code (comments and docstrings do not
count; there are no knob overrides through the environment, so `AR_<KNOB>` fails too); every SWEEP
knob they name is a one-line constant of trainer/train.py; every repo path and relative link exists;
every command in the prompts is a repo command or on a small allowlist of external tools, and the
`sky` / `modal` ones use subcommands and options the pinned CLIs in .venv really have.

End to end (about a minute on two cores): the ```bash e2e blocks of agent-prompts/local.md, then of
fanout.md, run line by line in a throwaway copy of the repository on the CPU smoke profile, so
editing those blocks changes what the test runs. Two mechanisms, both deliberate:
  * a `# edit trainer/train.py ...` comment line stands for the agent's edit: the test rewrites the
    knob constant line `WARMDOWN_RATIO = ...` there (a different value each time), like an agent
    trying one idea per branch; the block's `git commit` then makes it a candidate commit;
  * `make` is a shim on PATH that adds `-o .venv/.setup-stamp`, so `make setup` in the copy (whose
    .venv is a symlink to this repository's) never reinstalls into the shared venv.
A baseline of four runs first, then a K=4 SWEEP round (no controls: the best has its runs), then K=2 branches.
"""

import ast
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tokenize
from functools import cache

import pytest
from conftest import REPO, clean_env, local_repo

PROMPT_DIR = REPO / "agent-prompts"
PROMPTS = sorted(p for p in PROMPT_DIR.glob("*.md") if p.name != "README.md")  # the index is not a prompt
BACKEND_DIRS = ("local", "batch-job", "sky", "modal")
_OTHER_DOCS = ([REPO / "README.md"] + sorted(REPO.glob("*/README.md")) + sorted(REPO.glob("examples/*/README.md"))
               + sorted((REPO / "docs").glob("*.md")))
DOCS = PROMPTS + [p for p in _OTHER_DOCS if not p.relative_to(REPO).parts[0].startswith(".")]
TEXT = {p.relative_to(REPO).as_posix(): p.read_text() for p in DOCS}
TOP_DIRS = BACKEND_DIRS + ("tools", "scripts", "prepare", "trainer", "docs", "examples", "agent-prompts", "tests",
                           ".ci")
VENV_PY = REPO / ".venv" / "bin" / "python"
SKIP_DIRS = {".venv", ".git", ".ar", "tests", "__pycache__", ".pytest_cache", ".ruff_cache", "agent-prompts"}


# ----------------------------------------------------------------------------------------------
# extracting code from markdown
# ----------------------------------------------------------------------------------------------
FENCE = re.compile(r"^[ \t]*```([^\n]*)\n(.*?)^[ \t]*```[ \t]*$", re.M | re.S)


def fenced_blocks(text):
    """[(info string, body)] of the ``` blocks."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def inline_spans(text):
    rest = FENCE.sub("", text)
    return [a or b for a, b in re.findall(r"``(.+?)``|`([^`\n]+)`", rest)]


def indented_lines(text):
    """Lines of indented code blocks (four spaces after a blank line, outside fences)."""
    out, in_block, prev_blank = [], False, True
    for line in FENCE.sub("", text).splitlines():
        if re.match(r"^(?: {4}|\t)\S", line) and (in_block or prev_blank):
            out.append(line.strip())
            in_block = True
        elif line.strip():
            in_block = False
        prev_blank = not line.strip()
    return out


def code_text(text):
    """Everything that is code in a markdown file: fenced blocks, indented blocks, inline spans."""
    return "\n".join([body for _, body in fenced_blocks(text)] + indented_lines(text) + inline_spans(text))


# ----------------------------------------------------------------------------------------------
# make targets and their variables
# ----------------------------------------------------------------------------------------------
MAKEFILE = (REPO / "Makefile").read_text()
MAKE_VARS = set(re.findall(r"\$\(value ([A-Z_][A-Z0-9_]*)\)", MAKEFILE)) | {"PYTHON"}
MAKE_CALL = re.compile(r"(?:^|[\s;&|(])make((?:\s+-[-\w.=/]+)*)\s+([a-z][a-z0-9-]*)\b([^\n;&|#`]*)")


def make_calls():
    """{(doc, target, variables named after the target)}."""
    calls = set()
    for doc, text in TEXT.items():
        for line in code_text(text).splitlines():
            for _, target, rest in MAKE_CALL.findall(line):
                rest = re.sub(r"\"[^\"]*\"|'[^']*'", "''", rest)
                names = tuple(sorted({m for m in re.findall(r"(?:^|[\s\[])([A-Z][A-Z0-9_]*)=", rest)}))
                calls.add((doc, target, names))
    return calls


def make_targets():
    return sorted({t for _, t, _ in make_calls()})


def test_docs_name_the_main_targets():
    """The extraction works: the prompts name the targets the loop needs."""
    assert {"round", "baseline", "status", "results", "plot", "promote", "setup", "prepare",
            "modal-deploy"} <= set(make_targets())


@pytest.mark.parametrize("target", make_targets())
def test_make_targets_named_in_docs_exist(target):
    p = subprocess.run(["make", "-n", "-o", ".venv/.setup-stamp", target], cwd=REPO, capture_output=True,
                       text=True, env=clean_env(), timeout=60)
    assert p.returncode == 0, f"make {target}: {p.stderr.strip()}"


def test_make_variables_named_in_docs_are_read_by_the_makefile():
    bad = [f"{doc}: make {target} {name}=" for doc, target, names in sorted(make_calls()) for name in names
           if name not in MAKE_VARS and not name.startswith("AR_")]  # AR_* are checked as environment variables
    assert not bad, f"variables the Makefile does not read (it reads {sorted(MAKE_VARS)}): {bad}"


# ----------------------------------------------------------------------------------------------
# scripts
# ----------------------------------------------------------------------------------------------
def script_paths():
    pattern = r"(?<![\w/.$<-])((?:%s)/[A-Za-z0-9_./-]+\.(?:sh|py))\b" % "|".join(re.escape(d) for d in TOP_DIRS)
    return sorted({m for text in TEXT.values() for m in re.findall(pattern, text)})


def test_docs_name_the_backend_scripts():
    names = set(script_paths())
    for d in BACKEND_DIRS:
        assert {f"{d}/submit-async.sh", f"{d}/wait-jobs.sh", f"{d}/cancel-jobs.sh", f"{d}/logs.sh"} <= names, d
    assert {"tools/round.py", "batch-job/prep.sh", "modal/app.py"} <= names


@pytest.mark.parametrize("path", script_paths())
def test_scripts_named_in_docs_exist_and_answer_help(path):
    file = REPO / path
    assert file.is_file(), f"{path} is named in the docs but does not exist"
    if file.name.startswith("_") or path.startswith("tests/") or path in ("trainer/train.py", "modal/app.py"):
        return  # internals, test code, the trainer (it would train), the Modal app (run through `modal run`)
    if file.suffix == ".sh":
        assert os.access(file, os.X_OK), f"{path} is not executable"
        cmd = [str(file), "--help"]
    else:
        cmd = [str(VENV_PY if VENV_PY.exists() else "python3"), str(file), "--help"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=clean_env(), timeout=120)
    assert p.returncode == 0 and p.stdout.strip(), f"{path} --help: rc={p.returncode} {p.stderr.strip()[:300]}"


# ----------------------------------------------------------------------------------------------
# environment variables
# ----------------------------------------------------------------------------------------------
def _strip_python(source):
    """Python source without comments and docstrings (string literals and code stay)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            for i in range(body[0].lineno - 1, body[0].end_lineno):
                lines[i] = "\n"
    out = []
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type != tokenize.COMMENT:
            out.append(tok.string)
    return " ".join(out)


def _strip_hash_comments(source, trailing):
    lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith("#")]
    if trailing:
        lines = [re.sub(r"\s+#.*$", "", ln) for ln in lines]
    return "\n".join(re.sub(r"\s##\s.*$", "", ln) for ln in lines)  # a Makefile's `## help` text


@cache
def code_corpus():
    """The project's code (not its tests or docs), without comments and docstrings."""
    parts = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            path = os.path.join(root, name)
            suffix = os.path.splitext(name)[1]
            if suffix not in (".py", ".sh", ".yaml", ".yml", ".toml") and name not in ("Makefile", "run"):
                continue
            text = open(path, errors="replace").read()
            if suffix == ".py":
                parts.append(_strip_python(text))
            else:
                parts.append(_strip_hash_comments(text, trailing=suffix in (".yaml", ".yml", ".toml")))
    return "\n".join(parts)


def env_vars():
    pattern = r"(?<![\w$])((?:AR|AUTORESEARCH|SKY|VESSLCTL)_[A-Z0-9_]*[A-Z0-9])\b"
    return sorted({m for text in TEXT.values() for m in re.findall(pattern, text)})


@pytest.mark.parametrize("name", env_vars())
def test_environment_variables_named_in_docs_are_read_by_the_code(name):
    assert re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", code_corpus()), \
        f"{name} is documented but no script or module reads it (only comments or docs mention it)"


def sweep_knobs():
    """{(doc, knob)} of every SWEEP="KNOB=v1,v2 ..." the docs show with real values."""
    found = set()
    for doc, text in TEXT.items():
        for sweep in re.findall(r'SWEEP="([^"]*)"', text):
            found |= {(doc, m) for m in re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)=[0-9]", sweep)}
    return sorted(found)


def test_sweep_knobs_named_in_docs_are_constants_of_the_train_file():
    """A SWEEP rewrites a one-line module constant `KNOB = ...` of the train file (tools/round.py)."""
    assert sweep_knobs(), "the extraction found no SWEEP"
    source = (REPO / "trainer" / "train.py").read_text()
    tree = ast.parse(source)
    one_line = {n.targets[0].id for n in tree.body if isinstance(n, ast.Assign) and len(n.targets) == 1
                and isinstance(n.targets[0], ast.Name) and n.value.lineno == n.value.end_lineno}
    bad = [f"{doc}: {knob}" for doc, knob in sweep_knobs() if knob not in one_line]
    assert not bad, f"SWEEP knobs that are not one-line constants of trainer/train.py: {bad}"


# ----------------------------------------------------------------------------------------------
# repo paths and links
# ----------------------------------------------------------------------------------------------
def file_paths():
    pattern = r"(?<![\w/.$<-])((?:%s)/[A-Za-z0-9_.-]*(?:/[A-Za-z0-9_.-]+)*/?)" % "|".join(
        re.escape(d) for d in TOP_DIRS)
    found = set()
    for text in TEXT.values():
        for m in re.findall(pattern, text):
            m = m.split("::")[0].rstrip(".")
            if m.endswith("-") or re.search(r"[<>]", m):
                continue  # a name being built (`ar-<tag>-`), a placeholder
            if re.fullmatch(r"(?:local|sky|modal)/[\w. -]+/(?:default|full|tiny|smoke)", m):
                continue  # a setting backend/gpu/profile, as a round table's header prints it
            found.add(m)
    return sorted(found)


@pytest.mark.parametrize("path", file_paths())
def test_repo_paths_named_in_docs_exist(path):
    assert (REPO / path).exists(), f"{path} is named in the docs but does not exist"


def links():
    found = set()
    for doc, text in TEXT.items():
        prose = re.sub(r"``.+?``|`[^`\n]+`", "", FENCE.sub("", text))
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if not re.match(r"[a-z]+:", target) and not target.startswith("#"):
                found.add((doc, target.split("#")[0]))
    return sorted(found)


@pytest.mark.parametrize(("doc", "target"), links())
def test_relative_links_resolve(doc, target):
    assert ((REPO / doc).parent / target).exists(), f"{doc} links to {target}, which does not exist"


def test_prompts_name_existing_markdown_files():
    for p in PROMPTS:
        for name in re.findall(r"`([\w.-]+\.md)`", p.read_text()):
            assert (PROMPT_DIR / name).exists() or (REPO / name).exists(), f"{p.name} names {name}"


# ----------------------------------------------------------------------------------------------
# commands in the prompts: repo commands, or an allowlist of external ones
# ----------------------------------------------------------------------------------------------
GIT_SUBCOMMANDS = {"switch", "commit", "show", "log", "status", "rebase", "merge", "branch", "diff", "stash", "add",
                   "restore", "checkout", "archive", "rev-parse"}
VESSLCTL = {("auth", "login"), ("auth", "status"), ("volume", "create")}  # not installable here: exact allowlist
PLAIN_TOOLS = {"nvidia-smi", "tail", "mkdir", "cat", "export", "pip", "cp", "cd"}
KARPATHY_FILES = {"prepare.py", "train.py"}  # at the root of a karpathy/autoresearch checkout, not of this repo
# no setsid/nohup: a round that outlives the agent's shell tool is `make round ... DETACH=1`
COMMAND_WORDS = {"make", "git", "vesslctl", "sky", "modal", ".venv/bin/modal", ".venv/bin/python", "python", "uv"} \
    | PLAIN_TOOLS


def _segments(line):
    """Simple commands of a shell line as word lists: split on && || ; | & and $( ), with comments,
    redirections and leading VAR=value assignments dropped. `[optional args]` of a
    synopsis are dropped first."""
    line = re.sub(r"\s\[[^\]]*\]", "", line)
    line = re.sub(r"<[A-Za-z][\w .-]*>", "X", line)  # placeholders like <tag>, <job id> are words, not redirections
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split, lex.commenters = True, "#"
    try:
        tokens = list(lex)
    except ValueError:
        tokens = line.split()
    out, words, skip = [], [], False
    for tok in tokens + [";"]:
        if skip:
            skip = False
        elif re.fullmatch(r"[<>]+&?", tok):
            skip = True  # a redirection and its target
        elif re.fullmatch(r"[;&|()]+", tok):
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                words.pop(0)
            if words:
                out.append(words)
            words = []
        elif not (tok.endswith("$") and words == [] and "=" in tok):
            words.append(tok)  # (`id=$` before `(` is an assignment from a command substitution)
    return out


def _code_cells(text):
    """Text outside tables, plus table cells other than the first: a table's first column shows what
    the agent sees (messages), the others what it runs."""
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("|"):
            out.append(" ".join(line.strip().strip("|").split("|")[1:]))
        else:
            out.append(line)
    return "\n".join(out)


def prompt_commands():
    """[(prompt, words)]: every line of a fenced block, and every inline span of more than one word
    that starts with a command word or a repo script (a lone `sky` is a name, not a command)."""
    cmds = []
    for p in PROMPTS:
        text = p.read_text()
        lines = [ln for info, body in fenced_blocks(text) if info.split()[:1] in ([], ["bash"])
                 for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        for span in inline_spans(_code_cells(text)):
            raw = span.split()
            first = next((w for w in raw if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", w)), "")
            if len(raw) > 1 and (first in COMMAND_WORDS or re.fullmatch(r"[\w.-]+/[\w./-]+\.sh", first)):
                lines.append(span)
        cmds += [(p.name, words) for ln in lines for words in _segments(ln)]
    return cmds


@cache
def cli_help(*argv):
    exe = REPO / ".venv" / "bin" / argv[0]
    if not exe.exists():
        pytest.skip(f"{exe} is not installed (make setup)")
    p = subprocess.run([str(exe), *argv[1:], "--help"], capture_output=True, text=True, timeout=120,
                       env=clean_env(), cwd=REPO)
    assert p.returncode == 0, f"{' '.join(argv)} --help: {p.stderr.strip()[-300:]}"
    return p.stdout


SKY_INTROSPECT = """
import json
import click
from sky.client.cli.command import cli
out = {}
def walk(group, prefix):
    for name, cmd in group.commands.items():
        key = (prefix + " " + name).strip()
        out[key] = [o for p in cmd.params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]]
        if isinstance(cmd, click.Group):
            walk(cmd, key)
walk(cli, "")
print(json.dumps(out))
"""


@cache
def sky_cli():
    """{'launch': [options], 'api status': [...], ...} of the SkyPilot CLI pinned in .venv (read offline)."""
    if not (REPO / ".venv" / "bin" / "sky").exists():
        pytest.skip("the SkyPilot CLI is not installed in .venv (make setup)")
    p = subprocess.run([str(VENV_PY), "-c", SKY_INTROSPECT], capture_output=True, text=True, timeout=120,
                       env=clean_env(), cwd="/")
    assert p.returncode == 0, p.stderr[-500:]
    return json.loads(p.stdout)


@cache
def repo_help(path, *sub):
    cmd = [str(REPO / path)] if path.endswith(".sh") else [str(VENV_PY if VENV_PY.exists() else "python3"), path]
    p = subprocess.run([*cmd, *sub, "--help"], capture_output=True, text=True, timeout=120, env=clean_env(), cwd=REPO)
    assert p.returncode == 0, f"{path} {' '.join(sub)} --help: {p.stderr.strip()[-300:]}"
    return p.stdout


def _check_options(words, help_text, what):
    for w in words:
        if w.startswith("-") and w != "-":
            opt = w.split("=")[0]
            assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", help_text), f"{what}: no option {opt}"


def modal_entrypoints():
    tree = ast.parse((REPO / "modal" / "app.py").read_text())
    return {f.name: {a.arg for a in f.args.args} for f in tree.body if isinstance(f, ast.FunctionDef)
            and any("local_entrypoint" in ast.unparse(d) for d in f.decorator_list)}


def test_prompts_contain_commands():
    words = {w[0] for _, w in prompt_commands()}
    assert {"make", "git", "sky", "vesslctl", ".venv/bin/modal", ".venv/bin/python"} <= words, words


@pytest.mark.parametrize(("prompt", "words"), prompt_commands(), ids=lambda x: x if isinstance(x, str) else
                         " ".join(x)[:60])
def test_prompt_commands_exist(prompt, words):
    cmd, args = words[0], words[1:]
    what = f"{prompt}: {' '.join(words)}"
    if cmd == "uv" and args[:1] == ["run"] and args[1:2] in (["modal"], ["python"]):
        cmd, args = args[1], args[2:]  # `uv run modal ...` in a karpathy checkout is the modal CLI
    if cmd == "make":
        assert not args or args[0] in make_targets() or "=" in args[0], what  # targets: checked with make -n
    elif re.fullmatch(r"[\w.-]+/[\w./-]+\.(sh|py)", cmd):
        assert (REPO / cmd).is_file(), what
        _check_options(args, repo_help(cmd), what)
    elif cmd == "uv" and (args[:1] in (["sync"], ["add"]) or args[:1] == ["run"] and args[1:2]
                          and args[1] in KARPATHY_FILES):
        pass  # uv's own commands; the user's own checkout's prepare.py / train.py
    elif cmd in (".venv/bin/python", "python") or (cmd == "uv" and args[:1] == ["run"]):
        args = args[1:] if cmd == "uv" else args
        assert args and (REPO / args[0]).is_file(), what
        sub = args[1:2] if len(args) > 1 and not args[1].startswith("-") else []
        _check_options(args[1 + len(sub):], repo_help(args[0], *sub), what)
    elif cmd == "git":
        assert args and args[0] in GIT_SUBCOMMANDS, what
    elif cmd == "vesslctl":
        assert tuple(args[:2]) in VESSLCTL, what
    elif cmd == "sky":
        commands = sky_cli()
        sub = " ".join(args[:2]) if " ".join(args[:2]) in commands else (args[0] if args else "")
        assert sub in commands, f"{what}: the pinned SkyPilot CLI has no `sky {sub}`"
        _check_options(args[len(sub.split()):], " ".join(commands[sub]), what)
    elif cmd in ("modal", ".venv/bin/modal"):
        if args[:1] == ["run"]:
            target = args[1] if len(args) > 1 else ""
            assert target.startswith("modal/app.py::"), what
            entry = target.split("::")[1]
            params = modal_entrypoints().get(entry)
            assert params is not None, f"{what}: modal/app.py has no local entrypoint {entry}"
            for w in args[2:]:
                if w.startswith("--"):
                    assert w[2:].split("=")[0].replace("-", "_") in params, f"{what}: {entry} takes no {w}"
        elif args[:1] == ["deploy"]:
            assert args[1:] == ["modal/app.py"], what
        else:
            assert args[:2] in (["setup"], ["token", "info"], ["token", "new"]), what
            cli_help("modal", *args[:2])
    elif cmd == "pip":
        assert args[:1] == ["install"], what
    else:
        assert cmd in PLAIN_TOOLS, f"{what}: `{cmd}` is neither a repo command nor on the allowlist"


# ----------------------------------------------------------------------------------------------
# the prompts themselves
# ----------------------------------------------------------------------------------------------
def test_the_prompts_exist_and_stay_short():
    names = {p.name for p in PROMPTS}
    assert {"program.md", "fanout.md", "local.md", "vessl.md", "sky.md", "modal.md"} <= names
    for p in PROMPTS:
        lines = p.read_text().splitlines()
        assert len(lines) <= 130, f"{p.name}: {len(lines)} lines (keep it short enough to keep in context)"


def test_prompt_code_spans_do_not_cross_lines():
    """An inline `span` broken over two lines would hide its command from the checks above."""
    for p in PROMPTS:
        for i, line in enumerate(FENCE.sub("", p.read_text()).splitlines(), 1):
            assert line.count("`") % 2 == 0, f"{p.name}: a code span crosses the end of line {i}: {line!r}"


def test_the_prompts_cover_their_topics():
    text = {p.name: p.read_text() for p in PROMPTS}
    for word in ("trainer/train.py", "prepare/prepare.py", "val_bpb", "results.tsv", "keep", "discard", "crash",
                 "logs.sh", "Simplicity", "delta", "steps", "Never stop"):
        assert word in text["program.md"], word
    for word in ("SWEEP", "autoresearch/<tag>-r<N>-c", "refs/autoresearch/<tag>/r<N>-c<i>", "c0b",
                 "NOISE NOT MEASURED", "make baseline REPEATS=4", "abandon",
                 "AR_GPU=H200 make promote TOP=2 BACKEND=sky", "AR_BUDGET_USD", "make status", "make results",
                 "make plot", "DETACH=1", "make round-wait TIMEOUT=", "round is N again"):
        assert word in text["fanout.md"], word
    for name, backend in (("vessl.md", "vessl"), ("sky.md", "sky"), ("modal.md", "modal")):
        assert f"make round K=4 BACKEND={backend}" in text[name] and "make baseline" in text[name], name
        assert "| you see | do |" in text[name], name
    assert "| you see | do |" in text["local.md"]
    for name in ("local.md", "vessl.md", "sky.md", "modal.md"):
        assert "## In your own autoresearch checkout" in text[name] and "```bash copy" in text[name], name
    assert "## Without make" in text["fanout.md"]


# ----------------------------------------------------------------------------------------------
# end to end: local.md + fanout.md, verbatim
# ----------------------------------------------------------------------------------------------
EDIT_VALUES = ("0.3", "0.7", "0.4", "0.6")  # the n-th `# edit trainer/train.py` sets WARMDOWN_RATIO to these


def e2e_steps(name):
    """Commands of the ```bash e2e blocks of a prompt, in order; ("edit", None) for an edit line."""
    blocks = [body for info, body in fenced_blocks((PROMPT_DIR / name).read_text()) if info.split() == ["bash", "e2e"]]
    assert blocks, f"{name} has no ```bash e2e block"
    steps = []
    for line in (ln.strip() for b in blocks for ln in b.splitlines()):
        if line.startswith("# edit trainer/train.py"):
            steps.append(("edit", None))
        elif line and not line.startswith("#"):
            steps.append(("run", line))
    return steps


def agent_edit(repo, n):
    path = repo / "trainer" / "train.py"
    text, count = re.subn(r"^WARMDOWN_RATIO = [0-9.]+", f"WARMDOWN_RATIO = {EDIT_VALUES[n]}", path.read_text(),
                          count=1, flags=re.M)
    assert count == 1, "trainer/train.py has no WARMDOWN_RATIO constant to edit"
    path.write_text(text)


def test_local_and_fanout_prompts_run_verbatim(tmp_path, ar_cache):
    """Two rounds on the smoke profile as local.md then fanout.md show them: results.tsv and progress.png."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "make").write_text(f'#!/bin/sh\nexec {shutil.which("make")} -o .venv/.setup-stamp "$@"\n')
    (shim / "make").chmod(0o755)
    repo, env = local_repo(tmp_path, AR_CACHE_DIR=ar_cache, AR_PROFILE="smoke", AR_LOCAL_SLOTS="2",
                           MPLBACKEND="Agg", PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")

    steps = e2e_steps("local.md") + e2e_steps("fanout.md")
    assert [c for kind, c in steps if kind == "run" and c.startswith("make round ")] == \
        ['make round K=4 SWEEP="MATRIX_LR=0.03,0.05,0.06,0.08"', "make round K=2"], \
        "the e2e blocks changed: update this test"
    outputs, edits = {}, 0
    for kind, command in steps:
        if kind == "edit":
            agent_edit(repo, edits)
            edits += 1
            continue
        p = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{command!r} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        outputs.setdefault(command, p.stdout)
    assert edits == 2

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    r1, r2 = outputs['make round K=4 SWEEP="MATRIX_LR=0.03,0.05,0.06,0.08"'], outputs["make round K=2"]
    assert r1.startswith("round 1 of tag default on local/cpu/smoke") and "next round: 2" in r1, r1
    assert r2.startswith("round 2 of tag default on local/cpu/smoke") and "next round: 3" in r2, r2
    assert "delta" in r2 and "steps" in r2 and ("winner: c" in r2 or "no winner:" in r2)

    rows = (repo / "results.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    assert header[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    records = [dict(zip(header, r.split("\t"), strict=True)) for r in rows[1:]]
    assert all(r["status"] in ("keep", "discard") and 0 < float(r["val_bpb"]) < 20 for r in records), records
    assert all(r["profile"] == "smoke" and r["backend"] == "local" and r["tag"] == "default" for r in records)
    assert all(r["job_id"] == f"ar-default-{'' if r['round'][0] == 'b' else 'r'}{r['round']}-{r['candidate']}"
               for r in records), records

    # the baseline: the unchanged best four times; round 1 then needs no control, and sigma is not rough
    base = [r for r in records if r["round"] == "b1"]
    assert [r["candidate"] for r in base] == ["base1", "base2", "base3", "base4"]
    assert len({r["commit"] for r in base}) == 1
    assert "from 4 runs of 1 commit(s)" in r1.splitlines()[0] and "rough" not in r1.splitlines()[0], r1
    one = [r for r in records if r["round"] == "1"]
    assert [r["candidate"] for r in one] == ["c1", "c2", "c3", "c4"], one
    for r, value in zip(one, ("0.03", "0.05", "0.06", "0.08"), strict=True):
        assert r["description"] == f"MATRIX_LR={value}"
        assert f"MATRIX_LR = {value}" in git("show", f"{r['commit']}:trainer/train.py")
    won1 = [r for r in one if r["status"] == "keep"]
    best1 = won1[0]["commit"] if won1 else base[0]["commit"]

    # round 2: two controls after a SWEEP winner (its winning run is no control), none after four; then the
    # branches the block prepared, with their commit subjects, parked under refs/autoresearch/
    two = [r for r in records if r["round"] == "2"]
    assert [r["candidate"] for r in two] == (["c0", "c0b"] if won1 else []) + ["c1", "c2"], two
    for r in two[-2:]:
        ref = f"refs/autoresearch/default/r2-{r['candidate']}"
        assert r["description"] == git("log", "-1", "--format=%s", ref)
        assert git("rev-parse", ref).startswith(r["commit"])
        assert git("rev-parse", f"{ref}~1").startswith(best1)  # one commit on the best of round 1
        edited = f"WARMDOWN_RATIO = {EDIT_VALUES[int(r['candidate'][1:]) - 1]}"
        assert edited in git("show", f"{ref}:trainer/train.py")
    assert not git("branch", "--list", "autoresearch/default-r2-c1")  # moved (c2 is still checked out)
    won2 = [r for r in two[-2:] if r["status"] == "keep"]
    assert len(won2) <= 1
    best = git("rev-parse", "autoresearch/default")  # the winner, fast-forwarded: it reads as plain code
    assert best.startswith(won2[0]["commit"] if won2 else best1)

    shown = outputs["make results"]
    assert shown.split()[:3] == ["tag", "round", "candidate"] and len(shown.splitlines()) == 1 + len(records), shown
    assert (repo / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_local_prompt_copy_into_a_karpathy_checkout_runs_verbatim(tmp_path):
    """local.md's ```bash copy block, as written, in a karpathy-layout checkout at ~/autoresearch (HOME is a
    temporary folder): no setting; `uv` is a shim that runs python (`uv run [python] X` -> python X); the
    checkout's train.py is test_round's stand-in (the reference block, a score that depends on MATRIX_LR)."""
    from test_round import GIT_ID, TRAIN

    home, shim = tmp_path / "home", tmp_path / "bin"
    ckout = home / "autoresearch"
    ckout.mkdir(parents=True)
    shim.mkdir()
    (shim / "uv").write_text(f'#!/bin/sh\n[ "$1" = run ] && shift\n[ "$1" = python ] && shift\n'
                             f'echo "$*" >>"$HOME/uv-calls"\nexec {sys.executable} "$@"\n')
    (shim / "uv").chmod(0o755)
    (ckout / "train.py").write_text(TRAIN)
    (ckout / "prepare.py").write_text("print('prepared')\n")
    (ckout / "uv.lock").write_text("version = 1\n")
    (ckout / ".gitignore").write_text("results.tsv\n")
    env = clean_env(**GIT_ID, HOME=home, PATH=f"{shim}{os.pathsep}{os.environ['PATH']}")
    for cmd in (["git", "init", "-q", "-b", "master"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=ckout, env=env, check=True)

    block = [body for info, body in fenced_blocks((PROMPT_DIR / "local.md").read_text()) if info == "bash copy"]
    assert len(block) == 1, "local.md has no single ```bash copy block"
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", block[0]], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "winner: c" in p.stdout and "round 1 of tag default on local/" in p.stdout, p.stdout
    lines = (ckout / "results.tsv").read_text().splitlines()
    rows = [dict(zip(lines[0].split("\t"), x.split("\t"), strict=True)) for x in lines[1:]]
    assert [r["candidate"] for r in rows] == ["c0", "c0b", "c1", "c2", "c3", "c4"], rows
    calls = (home / "uv-calls").read_text().splitlines()
    assert calls[:2] == ["prepare.py", "tools/round.py round --k=4 --sweep=MATRIX_LR=0.03,0.05,0.06,0.08"], calls
    assert calls.count("train.py") == 6  # every job ran the checkout's own command, `uv run train.py`
    assert "MATRIX_LR = 0.05" in subprocess.run(["git", "show", "autoresearch/default:train.py"], cwd=ckout, env=env,
                                                capture_output=True, text=True).stdout
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ckout, env=env, capture_output=True, text=True)
    assert status.stdout == "", status.stdout
