"""Rewards: math-verify in a pool of worker processes with timeouts (`verifier`), scoring a
group's verdicts into rewards and pass rates (`scoring`), and the rule that calls a group residual
(all correct or all wrong) from its pass rate (`residual`)."""
