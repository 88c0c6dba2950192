"""Peak memory of the cpu kernel: O((N + B) * D), never an N x B buffer.

N = 20000, B = 200000, D = 8: an N x B float32 buffer would be 16 GB; the inputs are 7 MB. The
forward must add less than 100 MB of peak resident memory over the inputs. Measured in a fresh
subprocess with ru_maxrss (peak RSS), after the inputs exist and torch is warmed up.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import resource, torch, poissonflow
    torch.manual_seed(0)
    x = torch.randn(20000, 8)
    y = torch.randn(200000, 8)
    poissonflow.poisson_field(x[:8], y[:64])  # load the extension, warm up allocators
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    v, ls = poissonflow.poisson_field(x, y, backend="cpu")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(v).all() and torch.isfinite(ls).all()
    print((after - before) / 1024.0)  # ru_maxrss is in KiB on Linux
    """
)


def test_forward_peak_memory_is_bounded(tmp_path):
    # cwd outside the repository, so that the installed package (with its extension) loads
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    added_mb = float(out.stdout.strip().splitlines()[-1])
    # outputs v (640 KB) + log_scale + packed charges (6.4 MB) + per-thread tiles: ~10 MB
    assert added_mb < 100.0, f"forward added {added_mb:.1f} MB of peak RSS"
