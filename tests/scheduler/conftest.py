"""Scheduler tests. That the scheduler never imports torch is checked in a fresh interpreter
(test_scheduler_runs_with_torch_blocked), not by blocking torch here: a global block would
leak into every test module collected after this folder."""
