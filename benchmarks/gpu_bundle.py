"""The wheel bundle that lets the GPU check run on a lent machine with no network.

The lent machine has Python 3.12 with torch (CUDA), transformers, peft, safetensors, numpy, typer,
rich, hypothesis and pytest, and no nnsight, zarr, numcodecs or gguf; it reaches no package
index. ``build`` (here, where PyPI is reachable) downloads manylinux wheels for that Python of
every package the project needs at run time (``pyproject.toml``'s dependencies, less
``SKIPPED``), with the closure of their own dependencies, and never those the machine provides
(``PROVIDED``: torch and its CUDA wheels, transformers, numpy). Packages the machine may well
have (huggingface-hub, pyyaml, peft, ...) are bundled too, as small fallbacks: ``install`` puts
a wheel in only where the machine lacks the package or has a version that does not satisfy what
the project and the bundle require. The bundle is refused above 60 MiB (a device call carries
64 MiB in all). The model configs and the SmolLM2 tokenizer that ``random:`` models use are
package data of ``ia2cache`` (``ia2cache/model_configs``), so they travel with the working tree.

Layout: ``<dir>/bundle.json`` (Python version, platforms, every wheel with its sha256) and
``<dir>/wheels/*.whl``.

Launch:
``python -m benchmarks.gpu_bundle build [--dir gpu_bundle] [--python-version 3.12]`` (``make gpu-bundle``),
``python -m benchmarks.gpu_bundle install --dir gpu_bundle --target DIR`` (offline, on the machine;
then ``PYTHONPATH=DIR:<repo>``), ``python -m benchmarks.gpu_bundle plan --dir gpu_bundle``.
Only the standard library and ``packaging`` (or pip's vendored copy) are imported.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / "gpu_bundle"
DEFAULT_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT_MIB = 60.0
PROVIDED = ("torch", "transformers", "numpy")
"""On the lent machine already, and too large to carry: never bundled, never descended into."""
PROVIDED_PREFIXES = ("nvidia-", "cuda-", "triton")
SKIPPED = {
    "matplotlib": "only `report` draws plots",
    "gguf": "only converting the default model's GGUF needs it; the check uses random: models",
    "typer": "only the CLI needs it (and the machine has it)",
    "rich": "only the CLI needs it (and the machine has it)",
}
"""Project dependencies the GPU check does not import, with the reason."""
EXTRA_ROOTS: tuple[str, ...] = ()
"""Imported by ia2cache directly although no dependency names it: none (google-crc32c, which
``ia2cache.store.direct`` imports, is declared, and comes with zarr's closure anyway)."""


def _packaging() -> Any:
    """``packaging``'s requirements/version/utils modules, or pip's vendored copy of them."""
    try:
        from packaging import markers, requirements, utils
    except ImportError:  # pip vendors it
        from pip._vendor.packaging import markers, requirements, utils  # type: ignore[no-redef]
    return argparse.Namespace(Requirement=requirements.Requirement, canonicalize_name=utils.canonicalize_name,
                              default_environment=markers.default_environment)


def _canon(name: str) -> str:
    return _packaging().canonicalize_name(name)


def is_provided(name: str) -> bool:
    n = _canon(name)
    return n in PROVIDED or n.startswith(PROVIDED_PREFIXES)


def marker_env(python_version: str) -> dict[str, str]:
    """PEP 508 marker values of CPython ``python_version`` on x86-64 Linux (the lent machine)."""
    return {
        "python_version": python_version, "python_full_version": f"{python_version}.0",
        "implementation_name": "cpython", "implementation_version": f"{python_version}.0",
        "platform_python_implementation": "CPython", "platform_system": "Linux",
        "platform_machine": "x86_64", "sys_platform": "linux", "os_name": "posix",
        "platform_release": "", "platform_version": "", "extra": "",
    }


def _applies(req: Any, env: dict[str, str]) -> bool:
    """Whether a requirement applies without extras under ``env``."""
    return req.marker is None or req.marker.evaluate(env)


def project_requirements(repo: Path = REPO) -> list[str]:
    """pyproject.toml's run-time dependencies that the GPU check imports (less ``SKIPPED``)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        from pip._vendor import tomli as tomllib  # type: ignore[no-redef]
    deps = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    P = _packaging()
    return [d for d in deps if _canon(P.Requirement(d).name) not in SKIPPED] + list(EXTRA_ROOTS)


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) read from a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8"))
    return msg["Name"], msg["Version"], msg.get_all("Requires-Dist") or []


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- build (online)


def _download(reqs: list[str], dest: Path, python_version: str, platforms: tuple[str, ...]) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp", "-d", str(dest),
           "--disable-pip-version-check", "-q", "--progress-bar", "off"]
    for p in platforms:
        cmd += ["--platform", p]
    subprocess.run(cmd + reqs, check=True)


def resolve_and_download(roots: list[str], dest: Path, python_version: str,
                         platforms: tuple[str, ...] = PLATFORMS) -> dict[str, Path]:
    """Download ``roots`` and the closure of their dependencies (less ``PROVIDED``) into ``dest``
    as wheels for ``python_version``; one wheel per package satisfying every requirement seen."""
    P = _packaging()
    env = marker_env(python_version)
    specs: dict[str, Any] = {}  # canonical name -> combined SpecifierSet
    have: dict[str, Path] = {}
    pending = [r for r in map(P.Requirement, roots) if not is_provided(r.name)]
    while pending:
        for req in pending:
            n = _canon(req.name)
            specs[n] = specs[n] & req.specifier if n in specs else req.specifier
        want = []
        for n, spec in sorted(specs.items()):
            if n in have and spec.contains(wheel_metadata(have[n])[1], prereleases=True):
                continue
            if n in have:  # an older download no longer fits every requirement: fetch again
                have.pop(n).unlink()
            want.append(f"{n}{spec}")
        pending = []
        if not want:
            break
        before = set(dest.glob("*.whl"))
        _download(want, dest, python_version, platforms)
        for path in sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob("*.whl")):
            name, _, requires = wheel_metadata(path)
            if _canon(name) in have:
                continue
            have[_canon(name)] = path
            for line in requires:
                r = P.Requirement(line)
                if _applies(r, env) and not is_provided(r.name):
                    pending.append(r)
        missing = [w for w in want if _canon(P.Requirement(w).name) not in have]
        if missing:
            raise SystemExit(f"gpu_bundle: pip downloaded no wheel for {missing}")
    return have


def build(out: Path = DEFAULT_DIR, python_version: str = DEFAULT_PYTHON,
          platforms: tuple[str, ...] = PLATFORMS, limit_mib: float = LIMIT_MIB) -> dict[str, Any]:
    """Fill ``out`` with the bundle for ``python_version``; refuses (SystemExit 1) above the limit."""
    roots = project_requirements()
    wheels_dir = out / "wheels"
    (out / "bundle.json").unlink(missing_ok=True)
    if wheels_dir.exists():
        shutil.rmtree(wheels_dir)
    wheels_dir.mkdir(parents=True)
    have = resolve_and_download(roots, wheels_dir, python_version, platforms)
    for stray in set(wheels_dir.glob("*.whl")) - set(have.values()):
        stray.unlink()
    wheels = []
    for path in sorted(have.values()):
        name, version, _ = wheel_metadata(path)
        wheels.append({"file": path.name, "name": _canon(name), "version": version,
                       "bytes": path.stat().st_size, "sha256": _sha256(path)})
    total = sum(w["bytes"] for w in wheels)
    meta = {
        "python_version": python_version, "platforms": list(platforms), "roots": roots,
        "provided_by_machine": list(PROVIDED) + [p + "*" for p in PROVIDED_PREFIXES],
        "skipped": SKIPPED, "wheels": wheels, "bytes": total,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "built_with": platform.python_version(),
    }
    mib = total / 2**20
    for w in wheels:
        print(f"  {w['bytes'] / 2**20:7.2f} MiB  {w['file']}")
    print(f"gpu_bundle: {len(wheels)} wheels for Python {python_version}, {mib:.1f} MiB in {out} "
          f"(limit {limit_mib:g} MiB)")
    if mib > limit_mib:
        raise SystemExit(f"gpu_bundle: {mib:.1f} MiB is above the {limit_mib:g} MiB limit; refused "
                         "(bundle.json not written)")
    (out / "bundle.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta


# ----------------------------------------------------------------------------- install (offline)


def load_bundle(bundle: Path) -> dict[str, Any]:
    try:
        return json.loads((bundle / "bundle.json").read_text())
    except OSError as exc:
        raise SystemExit(f"gpu_bundle: no bundle at {bundle} ({exc}); build it with `make gpu-bundle` "
                         "and carry it to the machine") from exc


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def plan(bundle: Path) -> list[dict[str, Any]]:
    """For every bundled wheel and every provided package: what this interpreter has, what is
    required of it, and whether the bundled wheel is to be installed."""
    P = _packaging()
    meta = load_bundle(bundle)
    env = {**P.default_environment(), "extra": ""}
    required: dict[str, list[str]] = {}
    lines = project_requirements()
    for w in meta["wheels"]:
        lines += wheel_metadata(bundle / "wheels" / w["file"])[2]
    for line in lines:
        r = P.Requirement(line)
        if _applies(r, env):
            required.setdefault(_canon(r.name), []).append(str(r.specifier))
    rows = []
    for w in meta["wheels"] + [{"name": n, "version": None, "file": None} for n in PROVIDED]:
        have = _installed(w["name"])
        specs = [s for s in required.get(w["name"], []) if s]
        ok = have is not None and all(
            P.Requirement(f"x{s}").specifier.contains(have, prereleases=True) for s in specs)
        rows.append({"name": w["name"], "bundled": w["version"], "machine": have, "requires": specs,
                     "machine_ok": ok, "install": w["file"] is not None and not ok, "file": w["file"]})
    return rows


def _unzip(wheel: Path, target: Path) -> None:
    """What ``pip install --target`` does with a wheel, for an interpreter without pip."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    for data in target.glob("*.data"):
        for sub in ("purelib", "platlib"):
            for item in (data / sub).glob("*") if (data / sub).is_dir() else []:
                shutil.move(str(item), target / item.name)
        shutil.rmtree(data)


def install(bundle: Path, target: Path) -> list[dict[str, Any]]:
    """Install the wheels this interpreter needs from ``bundle`` into ``target`` (emptied first),
    with ``pip install --no-index --no-deps --target``; never touches the network."""
    meta = load_bundle(bundle)
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if meta["python_version"] != mine:
        raise SystemExit(f"gpu_bundle: {bundle} holds wheels for Python {meta['python_version']}, this is "
                         f"Python {mine}; rebuild with `make gpu-bundle GPU_PYTHON={mine}`")
    for w in meta["wheels"]:
        path = bundle / "wheels" / w["file"]
        if not path.is_file() or _sha256(path) != w["sha256"]:
            raise SystemExit(f"gpu_bundle: {path} is missing or damaged (sha256 differs from bundle.json)")
    rows = plan(bundle)
    chosen = [bundle / "wheels" / r["file"] for r in rows if r["install"]]
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    if chosen:
        try:
            import pip  # noqa: F401
        except ImportError:
            for wheel in chosen:
                _unzip(wheel, target)
        else:
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade",
                            "--disable-pip-version-check", "-q", "--target", str(target),
                            *map(str, chosen)], check=True)
    (target / "ia2cache_bundle_install.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def _print_plan(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        what = "install" if r["install"] else ("machine's" if r["machine_ok"] else "MISSING")
        if r["file"] is None and not r["machine_ok"]:
            what = "WARNING: the machine's version does not satisfy the requirements"
        print(f"  {r['name']:<22} bundled {r['bundled'] or '-':<12} machine {r['machine'] or '-':<14} "
              f"{what}  {' '.join(r['requires'])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="download the wheels (needs PyPI)")
    b.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    b.add_argument("--python-version", default=DEFAULT_PYTHON)
    b.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    i = sub.add_parser("install", help="install what this interpreter lacks (offline)")
    i.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    i.add_argument("--target", type=Path, default=Path(tempfile.gettempdir()) / "ia2cache-gpu-site")
    p = sub.add_parser("plan", help="what install would do here")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.dir, args.python_version, limit_mib=args.limit_mib)
    elif args.cmd == "install":
        rows = install(args.dir, args.target)
        _print_plan(rows)
        print(f"gpu_bundle: installed {sum(r['install'] for r in rows)} wheels into {args.target}")
    else:
        _print_plan(plan(args.dir))


if __name__ == "__main__":
    main()
