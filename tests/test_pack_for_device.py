"""simulations/pack_for_device.py: parts join back into the installed files, bit for bit; a bad part is refused."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "simulations" / "pack_for_device.py"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_parts_unpack_to_the_installed_files_and_a_cut_part_is_refused(tmp_path: Path) -> None:
    dist = md.distribution("rouge-score")
    site = Path(dist.locate_file("")).resolve()
    packed = run("pack", "rouge-score", "--prefix", str(tmp_path / "p"), "--part-mb", "0.05", cwd=tmp_path)
    assert packed.returncode == 0, packed.stderr
    parts = sorted(tmp_path.glob("p*/pack.part*"))
    assert len(parts) >= 2  # the distribution is larger than one 50 kB part
    pool = tmp_path / "pool"
    pool.mkdir()
    for p in parts:
        (pool / p.name).write_bytes(p.read_bytes())
    (pool / "pack.manifest.json").write_bytes((parts[0].parent / "pack.manifest.json").read_bytes())
    out = run("unpack", "--parts", str(pool), "--target", str(tmp_path / "site"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    files = [f for f in dist.files if (site / f).is_file() and "__pycache__" not in Path(f).parts]
    assert files
    for f in files:
        assert (tmp_path / "site" / f).read_bytes() == (site / f).read_bytes(), f
    # a part cut short (a stale or truncated carry) fails the manifest's sha256, and says so
    last = pool / parts[-1].name
    last.write_bytes(last.read_bytes()[:-1])
    bad = run("unpack", "--parts", str(pool), "--target", str(tmp_path / "site2"), cwd=tmp_path)
    assert bad.returncode != 0 and "do not match the manifest" in bad.stderr
    last.unlink()
    missing = run("unpack", "--parts", str(pool), "--target", str(tmp_path / "site3"), cwd=tmp_path)
    assert missing.returncode != 0 and "parts missing" in missing.stderr


def test_an_unknown_distribution_names_the_fix(tmp_path: Path) -> None:
    out = run("pack", "no-such-distribution-xyz", "--prefix", str(tmp_path / "p"), cwd=tmp_path)
    assert out.returncode != 0 and "pip install it first" in out.stderr
    assert not (tmp_path / "p0").exists()
