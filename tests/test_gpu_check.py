"""The GPU check's offline path: the wheel bundle, its install plan, the correctness comparison,
and a CPU simulation of the whole lent-machine run (``test_offline_gpu_check_simulated_on_cpu``).

The simulation builds what the lent machine is: a fresh venv whose only packages are the ones
the machine has (torch, transformers, peft, safetensors, numpy, typer, rich, hypothesis, pytest
and their dependencies, exposed from this project's venv by a .pth file; nnsight, zarr,
numcodecs and gguf are not visible), a copy of the working tree as the device gets it (tracked
and untracked files that git does not ignore, plus the carried bundle), no PYTHONPATH and a dead
proxy. It then runs ``bash benchmarks/gpu_check.sh`` there as the device would, with
``--preset sim --device cpu`` and a tiny random model. The bundle is built for this Python under
``.gpu_sim/`` (ignored) the first time, which needs PyPI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import gpu_bundle
from benchmarks._common import budget_kwargs

REPO = Path(__file__).resolve().parent.parent
MACHINE = ("torch", "transformers", "peft", "safetensors", "numpy", "typer", "rich", "hypothesis", "pytest")
"""What the lent machine has installed, from its documentation."""
ABSENT = ("nnsight", "zarr", "numcodecs", "gguf")
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "vocab_size": 49152, "max_position_embeddings": 1024, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "rope_theta": 10000.0,
    "initializer_range": 0.02,
}


# ----------------------------------------------------------------------------- bundle, offline


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A minimal pure-python wheel with one module ``<name>.py``."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", f"VALUE = {version!r}\n")
        z.writestr(f"{info}/METADATA", meta)
        z.writestr(f"{info}/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def fake_bundle(root: Path, wheels: list[tuple[str, str, list[str]]]) -> Path:
    (root / "wheels").mkdir(parents=True)
    rows = []
    for name, version, requires in wheels:
        p = fake_wheel(root / "wheels", name, version, requires)
        rows.append({"file": p.name, "name": name, "version": version, "bytes": p.stat().st_size,
                     "sha256": gpu_bundle._sha256(p)})
    (root / "bundle.json").write_text(json.dumps(
        {"python_version": f"{sys.version_info[0]}.{sys.version_info[1]}", "wheels": rows}))
    return root


def test_install_puts_in_only_what_this_interpreter_lacks_or_has_too_old(tmp_path: Path) -> None:
    import pytest as pytest_module

    have = pytest_module.__version__
    bundle = fake_bundle(tmp_path / "b", [
        ("ia2fakea", "1.0", ["pytest>=1"]),     # absent here: installed
        ("pytest", "99.0", []),                 # present and new enough: the machine's is kept
        ("ia2fakeb", "2.0", ["ia2fakea>=1"]),
    ])
    rows = {r["name"]: r for r in gpu_bundle.install(bundle, tmp_path / "site")}
    assert rows["ia2fakea"]["install"] and rows["ia2fakeb"]["install"]
    assert not rows["pytest"]["install"] and rows["pytest"]["machine"] == have
    assert rows["torch"]["file"] is None and rows["torch"]["machine_ok"]  # provided, checked only
    assert sorted(p.name for p in (tmp_path / "site").glob("*.py")) == ["ia2fakea.py", "ia2fakeb.py"]
    plan = json.loads((tmp_path / "site" / "ia2cache_bundle_install.json").read_text())
    assert {r["name"] for r in plan if r["install"]} == {"ia2fakea", "ia2fakeb"}

    too_old = fake_bundle(tmp_path / "c", [("ia2fakea", "1.0", ["pytest>=999"]), ("pytest", "999.0", [])])
    rows = {r["name"]: r for r in gpu_bundle.install(too_old, tmp_path / "site")}
    assert rows["pytest"]["install"] and not rows["pytest"]["machine_ok"]
    assert not (tmp_path / "site" / "ia2fakeb.py").exists()  # the target is emptied first


def test_install_refuses_a_damaged_bundle_or_another_python(tmp_path: Path) -> None:
    bundle = fake_bundle(tmp_path / "b", [("ia2fakea", "1.0", [])])
    wheel = next((bundle / "wheels").glob("*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"x")
    with pytest.raises(SystemExit, match="damaged"):
        gpu_bundle.install(bundle, tmp_path / "site")
    meta = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**meta, "python_version": "2.7"}))
    with pytest.raises(SystemExit, match="wheels for Python 2.7"):
        gpu_bundle.install(bundle, tmp_path / "site")
    with pytest.raises(SystemExit, match="make gpu-bundle"):
        gpu_bundle.install(tmp_path / "nothing", tmp_path / "site")


def test_bundle_roots_are_the_run_time_dependencies() -> None:
    from packaging.requirements import Requirement

    names = {Requirement(r).name for r in gpu_bundle.project_requirements()}
    assert {"nnsight", "zarr", "numcodecs", "peft", "safetensors"} <= names
    assert gpu_bundle.EXTRA_ROOTS == ()  # google-crc32c is declared (and in zarr's closure too)
    assert not names & set(gpu_bundle.SKIPPED)
    assert gpu_bundle.is_provided("torch") and gpu_bundle.is_provided("nvidia-cudnn-cu13")
    assert not gpu_bundle.is_provided("nnsight")


def test_budget_keywords_follow_the_distill_config() -> None:
    import dataclasses

    from ia2cache.distill import DistillConfig

    kw = budget_kwargs(DistillConfig, 3)
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    assert set(kw) <= fields and 3 in kw.values()

    @dataclasses.dataclass
    class Old:
        epochs: int = 50

    assert budget_kwargs(Old, 3) == {"epochs": 3}


def test_compare_with_forward_passes_the_same_model_and_fails_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.gpu_check import compare_with_forward
    from ia2cache.collect import CollectConfig, collect
    from ia2cache.models import load_model
    from ia2cache.store import Cache

    monkeypatch.setenv("IA2CACHE_HOME", str(tmp_path / "home"))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(TINY))
    spec = f"random:{tmp_path / 'tiny'}"
    lm = load_model(spec, device="cpu", dtype=torch.bfloat16)
    res = collect(CollectConfig(task="antonyms", n=4, k=2, max_new_tokens=3, site="resid", batch_size=4,
                                store=str(tmp_path / "store")), lm)
    cache = Cache.open(res.cache)
    same = compare_with_forward(lm, cache, need_control=True)
    assert same["ok"] and same["control_sees_misalignment"], same
    other = compare_with_forward(load_model(spec + ":1", device="cpu", dtype=torch.bfloat16), cache)
    assert not other["ok"] and other["max_rel_l2_error"] > 0.5, other


# ----------------------------------------------------------------------------- the simulation


def _closure(roots: tuple[str, ...]) -> list[Any]:
    """Installed distributions of ``roots`` and their dependencies (no extras), in this venv."""
    import importlib.metadata as md

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {**default_environment(), "extra": ""}
    seen: dict[str, Any] = {}
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[name] = dist
        for line in dist.requires or []:
            r = Requirement(line)
            if r.marker is None or r.marker.evaluate(env):
                todo.append(r.name)
    return list(seen.values())


def machine_like_venv(root: Path) -> Path:
    """A venv that sees only ``MACHINE`` and its dependencies (symlinked from this venv)."""
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    py = root / "venv" / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    shadow = root / "machine-site"
    shadow.mkdir()
    for dist in _closure(MACHINE):
        base = Path(dist.locate_file(""))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"__pycache__"}:
            src = base / top
            if src.exists() and not top.endswith(".pth") and not (shadow / top).exists():
                (shadow / top).symlink_to(src)
    (site / "machine.pth").write_text(str(shadow) + "\n")
    return py


def sim_bundle() -> Path:
    """The bundle for this Python, built once under .gpu_sim/ (needs PyPI the first time)."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    out = REPO / ".gpu_sim" / f"bundle-py{version}"
    if not (out / "bundle.json").is_file():
        try:
            gpu_bundle.build(out, python_version=version)
        except (subprocess.CalledProcessError, SystemExit) as exc:
            pytest.fail(f"could not build the wheel bundle for Python {version} into {out} "
                        f"(needs PyPI): {exc}")
    return out


def working_tree_copy(dest: Path) -> Path:
    """What the device gets: tracked and untracked-but-not-ignored files (the whole tree, less
    the usual ignored folders, where git is not there to ask)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, check=True, capture_output=True).stdout
        files = [f for f in out.decode().split("\0") if f and (REPO / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".venv", ".git", ".gpu_sim", "gpu_bundle", "__pycache__", ".pytest_cache", ".ruff_cache"}
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(REPO).parts)]
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    return dest


@pytest.mark.integration
def test_offline_gpu_check_simulated_on_cpu(tmp_path: Path) -> None:
    bundle = sim_bundle()
    py = machine_like_venv(tmp_path)
    probe = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    seen = subprocess.run([str(py), "-c", probe, *MACHINE, *ABSENT], check=True, capture_output=True,
                          text=True, env={"PATH": os.environ["PATH"]}).stdout
    here = [m for m in MACHINE if importlib.util.find_spec(m)]  # hypothesis may be absent here
    assert eval(seen) == here, f"the simulated machine is not the lent one: it sees {seen}"

    repo = working_tree_copy(tmp_path / "repo")
    shutil.copytree(bundle, repo / "gpu_bundle")  # carry ["gpu_bundle"]
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "tmp").mkdir()
    env = {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path), "TMPDIR": str(tmp_path / "tmp"),
        "PYTHON": str(py), "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1",
        "GPU_CHECK_TIMEOUT": "600",
        "GPU_CHECK_ARGS": f"--preset sim --device cpu --no-require-cuda --models random:{tmp_path / 'tiny'}",
        # Nothing may reach the network: any HTTP client goes to a closed port.
        "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
        "PIP_CONFIG_FILE": os.devnull,
    }
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["ok"] and len(report["stages"]) == 2, json.dumps(report)[:3000]
    steps = {k: v for st in report["stages"].values() for k, v in st["steps"].items()}
    assert {"collect_equals_forward", "resid_collect_equals_forward", "verify", "distill_act",
            "collect_vs_reference_t1", "collect_vs_reference_t2", "collect_vs_generate_t2_b2",
            "loader_distill"} <= set(steps)
    assert all(s["ok"] for s in steps.values())
    origin = steps["versions"]
    site = str(tmp_path / "tmp" / "ia2cache-gpu-site")
    for name in ("nnsight", "zarr", "numcodecs"):
        assert origin[name]["from"].startswith(site), origin[name]  # from the bundle
    assert not origin["torch"]["from"].startswith(site)  # the machine's own
    assert steps["collect_vs_reference_t2"]["speedup"] > 0
    assert 0 <= steps["loader_distill"]["data_wait_fraction"] <= 1
    assert (tmp_path / "out" / "gpu_check.log").is_file()
    assert (repo / "benchmarks" / "results" / "gpu" / "gpu_check.json").is_file()
    assert "install" in log and "ALL OK" in log
