"""The plugin's option-driven test: one test per ``--cautious-target`` / ``--cautious-config`` target.

Run it from anywhere: ``pytest --pyargs cautious.conformance.test_targets --cautious-config my_port.toml``.
Without a target the test is skipped as an empty parameter set.
"""


def test_target_conforms(cautious_target, cautious_conformance):
    result = cautious_conformance(cautious_target)
    assert sum(result.examples.values()) > 0
