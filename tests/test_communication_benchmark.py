"""benchmarks/communication.py at toy sizes: the keys the issue asks for, and byte ratios that follow
from the codecs (fp16 half of fp32; int8 (d + 4) / 4d a row, plus the narrow bias column)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_communication_reports_bytes_per_codec_and_the_ratio_keys():
    # Execute
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "communication.py"), "--items", "2000",
                           "--dim", "32"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=True)  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Assert
    size = result["sizes"]["2000"]
    assert size["sent_bytes"] == size["received_bytes_fp32"]
    assert 1.95 < result["bytes_ratio_fp16@2000"] <= 2.0
    # int8: (32 + 4) bytes a row of the id table against 128; the bias and content weights dilute it a little.
    assert 3.0 < result["bytes_ratio@2000"] < 128 / 36
    assert result["bytes_ratio@2000"] == result["bytes_ratio_int8@2000"]
