"""Helpers shared by the tests: ops (kernel-vs-twin checks, soundness sampling), op_error_cases
(every op's bad-input cases)."""
