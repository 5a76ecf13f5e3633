from __future__ import annotations

import subprocess
import sys


def test_analysis_never_imports_torch() -> None:
    code = (
        "import sys, samplescope.analysis, samplescope.cli.trace_cmds; "
        "from samplescope.analysis import scores, clusters, compare; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
