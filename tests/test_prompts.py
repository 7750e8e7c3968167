"""Keep agent-prompts/ and the READMEs true: every make target, script, environment variable and repo
file they name exists, and the command sequence of local.md + fanout.md runs as written.

The end-to-end test runs the ```bash e2e blocks of agent-prompts/local.md, then of fanout.md, line by
line in a throwaway copy of the repo on the CPU tiny profile: editing those blocks changes what runs.
"""

import re
import shutil
import subprocess

import pytest
from conftest import REPO, clean_env

PROMPTS = sorted(p for p in (REPO / "agent-prompts").glob("*.md") if p.name != "README.md")
DOCS = PROMPTS + [REPO / "README.md"] + sorted(REPO.glob("*/README.md")) + [REPO / "docs" / "contract.md"]
TEXT = {p.relative_to(REPO).as_posix(): p.read_text() for p in DOCS}
CODE_SUFFIXES = {".sh", ".py", ".yaml", ".yml", ".toml"}
CODE = "\n".join(p.read_text(errors="replace") for p in REPO.rglob("*")  # the project's code, not its tests
                 if p.is_file() and (p.suffix in CODE_SUFFIXES or p.name == "Makefile")
                 and not {".venv", ".git", ".ar", "__pycache__", "tests"} & set(p.relative_to(REPO).parts))
TRAIN = (REPO / "trainer" / "train.py").read_text()
KNOBS = set(re.findall(r"^([A-Z][A-Z0-9_]*) = ", TRAIN, re.M))
BACKEND_DIRS = ("local", "batch-job", "sky", "modal")
TOP_DIRS = BACKEND_DIRS + ("tools", "scripts", "prepare", "trainer", "docs", "examples", "agent-prompts", "tests")


def test_the_prompts_exist_and_stay_short():
    names = {p.name for p in PROMPTS}
    assert {"program.md", "fanout.md", "local.md", "vessl.md", "sky.md", "modal.md"} <= names
    for p in PROMPTS:
        lines = p.read_text().splitlines()
        assert 20 <= len(lines) <= 150, f"{p.name}: {len(lines)} lines (keep it pasteable)"


def make_targets():
    found = set()
    for text in TEXT.values():
        found |= set(re.findall(r"(?<![\w/.-])make ((?:[a-z][a-z-]*))(?=[\s`)\]]|$)", text, re.M))
    return sorted(found - {"it", "the", "sure", "one", "a"})


@pytest.mark.parametrize("target", make_targets())
def test_make_targets_named_in_docs_exist(target):
    p = subprocess.run(["make", "-n", "-o", ".venv/.setup-stamp", target], cwd=REPO, capture_output=True,
                       text=True, env=clean_env(), timeout=60)
    assert p.returncode == 0, f"make {target}: {p.stderr.strip()}"


def script_paths():
    pattern = r"(?<![\w/.-])((?:%s)/[A-Za-z0-9_./-]+\.(?:sh|py))\b" % "|".join(re.escape(d) for d in TOP_DIRS)
    found = set()
    for text in TEXT.values():
        found |= set(re.findall(pattern, text))
    return sorted(found)


@pytest.mark.parametrize("path", script_paths())
def test_scripts_named_in_docs_exist_and_answer_help(path):
    file = REPO / path
    assert file.is_file(), f"{path} is named in the docs but does not exist"
    if file.name.startswith("_") or path.startswith(("trainer/", "tests/", "modal/")) or path == "sky/promote.py":
        return  # internals, the trainer (it would train), test code, Modal apps (run through `modal run`)
    cmd = [str(file), "--help"] if file.suffix == ".sh" else [str(REPO / ".venv/bin/python"), str(file), "--help"]
    if not (REPO / ".venv/bin/python").exists() and file.suffix == ".py":
        cmd[0] = "python3"
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=clean_env(), timeout=60)
    assert p.returncode == 0 and p.stdout.strip(), f"{path} --help: rc={p.returncode} {p.stderr.strip()[:300]}"


def env_vars():
    found = set()
    for text in TEXT.values():
        found |= set(re.findall(r"\b((?:AR|AUTORESEARCH|SKY|VESSLCTL)_[A-Z0-9_]*[A-Z0-9])\b", text))
    return sorted(found)


@pytest.mark.parametrize("name", env_vars())
def test_environment_variables_named_in_docs_are_read_by_the_code(name):
    if name.startswith("AR_") and name[3:] in KNOBS:
        return  # a knob override: the trainer reads AR_<KNOB> for every knob
    assert re.search(rf"\b{re.escape(name)}\b", CODE), f"{name} is documented but no script or module reads it"


def file_paths():
    pattern = r"(?<![\w/.$<-])((?:%s)/[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*)" % "|".join(
        re.escape(d) for d in TOP_DIRS)
    found = set()
    for text in TEXT.values():
        for m in re.findall(pattern, text):
            m = m.rstrip(".").split("::")[0]
            if m.endswith(("-", "/")) or re.search(r"\.(tsv|png|json|log)$", m) and m.count("/") > 1:
                continue
            found.add(m)
    return sorted(found)


@pytest.mark.parametrize("path", file_paths())
def test_repo_paths_named_in_docs_exist(path):
    generated = ("examples/cpu-tiny/",)  # everything there is committed; kept in the check
    assert (REPO / path).exists() or path.startswith(generated) and (REPO / path).exists(), \
        f"{path} is named in the docs but does not exist"


def e2e_commands(name):
    text = (REPO / "agent-prompts" / name).read_text()
    blocks = re.findall(r"^```bash e2e\n(.*?)^```", text, re.M | re.S)
    assert blocks, f"{name} has no ```bash e2e block"
    return [line for b in blocks for line in b.splitlines() if line.strip() and not line.startswith("#")]


def test_local_and_fanout_prompts_run_verbatim(tmp_path, ar_cache):
    """Two rounds on the tiny profile following local.md then fanout.md: results.tsv and progress.png."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for rel in ("trainer", "prepare", "tools", "local"):
        shutil.copytree(REPO / rel, repo / rel, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("Makefile", "pyproject.toml", ".gitignore"):
        shutil.copy2(REPO / rel, repo / rel)  # keeps pyproject's mtime: the venv's setup stamp stays valid
    (repo / ".venv").symlink_to(REPO / ".venv")
    env = clean_env(AR_CACHE_DIR=ar_cache, AR_PROFILE="tiny", AR_LOCAL_SLOTS="2", AR_LOCAL_THREADS="1",
                    GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid", GIT_COMMITTER_NAME="t",
                    GIT_COMMITTER_EMAIL="t@example.invalid", MPLBACKEND="Agg")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    commands = e2e_commands("local.md") + e2e_commands("fanout.md")
    assert sum(c.startswith("make round ") for c in commands) == 2
    outputs = []
    for command in commands:
        p = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=400)
        assert p.returncode == 0, f"{command!r} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        outputs.append(p.stdout)
    rounds = [o for c, o in zip(commands, outputs, strict=True) if c.startswith("make round ")]
    assert rounds[0].startswith("round 1 of tag default") and "next round: 2" in rounds[0]
    assert rounds[1].startswith("round 2 of tag default") and "next round: 3" in rounds[1]
    rows = (repo / "results.tsv").read_text().splitlines()
    assert rows[0].split("\t")[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    header = rows[0].split("\t")
    records = [dict(zip(header, r.split("\t"), strict=True)) for r in rows[1:]]
    assert sorted(r["round"] for r in records) == ["1", "1", "1", "2", "2"]  # c0 + 2, then 2
    assert all(r["status"] in ("keep", "discard") and float(r["val_bpb"]) > 0 for r in records)
    png = repo / "progress.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
