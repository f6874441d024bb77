"""The dataflow's bookkeeping: prompt tickets and their leases, the checks every consumer runs on
decoded messages, the learner's intake rule, and the ledger that gives every ticket one fate."""
