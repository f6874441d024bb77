"""Rewards: math-verify in a pool of worker processes with timeouts (`verifier`), and scoring a
group's verdicts into rewards, pass rates and residual kinds (`scoring`)."""
