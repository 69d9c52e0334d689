"""The device run's checks in bench/compare.py on synthetic records: a run that failed, or
produced nothing, never passes (tests/bench_checks.rs runs this with the standard library only)."""

import json
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

OK = {"image": "a.png", "candidates": ["a red circle"], "captions": []}
FAILED = {"image": "a.png", "error": {"code": "INTERNAL", "message": "CUDA error"}}
LEVEL = {"concurrency": 1, "requests": 10, "errors": 0, "first_error": None}


class Checks(unittest.TestCase):
    def test_all_failed_pair_fails(self):
        self.assertTrue(compare.caption_failures("x", [FAILED], [FAILED]))

    def test_records_without_candidates_fail(self):
        empty = {"image": "a.png", "candidates": []}
        self.assertTrue(compare.caption_failures("x", [empty], [empty]))
        self.assertTrue(compare.caption_failures("x", [], []))

    def test_one_side_failing_fails(self):
        self.assertTrue(compare.caption_failures("x", [OK], [FAILED]))

    def test_same_captions_pass_and_different_fail(self):
        self.assertEqual(compare.caption_failures("x", [OK], [dict(OK)]), [])
        other = dict(OK, candidates=["a blue square"])
        self.assertTrue(compare.caption_failures("x", [OK], [other]))
        self.assertTrue(compare.caption_failures("x", [OK], [dict(OK, image="b.png")]))

    def test_caption_bench_errors_fail(self):
        self.assertEqual(compare.bench_failures("x", [LEVEL]), [])
        bad = dict(LEVEL, errors=3, first_error="Internal: CUDA out of memory")
        failures = compare.bench_failures("x", [LEVEL, bad])
        self.assertTrue(failures)
        self.assertIn("CUDA out of memory", failures[0])
        self.assertTrue(compare.bench_failures("x", [dict(LEVEL, requests=0)]))
        self.assertTrue(compare.bench_failures("x", []))

    def test_logits_within_and_beyond_tolerance(self):
        ref = {"logits": [[10.0, -2.0, 0.5]]}
        self.assertEqual(compare.logit_failures("x", ref, {"logits": [[10.05, -2.0, 0.5]]}, 0.01), [])
        self.assertTrue(compare.logit_failures("x", ref, {"logits": [[10.2, -2.0, 0.5]]}, 0.01))
        self.assertTrue(compare.logit_failures("x", ref, {"logits": [[10.0, -2.0]]}, 0.01))
        self.assertTrue(compare.logit_failures("x", ref, {"logits": [[float("nan"), -2.0, 0.5]]}, 0.01))
        self.assertTrue(compare.logit_failures("x", {"logits": []}, {"logits": []}, 0.01))

    def test_command_line_exits_nonzero_on_failure(self):
        with tempfile.TemporaryDirectory() as d:
            a, b = Path(d, "a.jsonl"), Path(d, "b.jsonl")
            a.write_text(json.dumps(FAILED) + "\n")
            b.write_text(json.dumps(FAILED) + "\n")
            run = [sys.executable, compare.__file__, "check", "captions", "x", str(a), str(b)]
            out = subprocess.run(run, capture_output=True, text=True)
            self.assertEqual(out.returncode, 1, out.stdout)
            self.assertIn("FAIL", out.stdout)
            b.write_text(json.dumps(dict(LEVEL, errors=1)) + "\n")
            out = subprocess.run([sys.executable, compare.__file__, "check", "bench", "x", str(b)],
                                 capture_output=True, text=True)
            self.assertEqual(out.returncode, 1, out.stdout)
            a.write_text(json.dumps(OK) + "\n")
            b.write_text(json.dumps(OK) + "\n")
            out = subprocess.run(run, capture_output=True, text=True)
            self.assertEqual(out.returncode, 0, out.stdout)
            # A step that wrote nothing fails its check rather than crashing it.
            missing = [sys.executable, compare.__file__, "check", "logits", "x", str(a), str(Path(d, "none")), "fp32"]
            out = subprocess.run(missing, capture_output=True, text=True)
            self.assertEqual(out.returncode, 1, out.stdout + out.stderr)
            self.assertIn("FAIL", out.stdout)


if __name__ == "__main__":
    unittest.main()
