"""The launcher stage: one run measured by several workers (GPUs of one machine, or SLURM array tasks through
submitit), every worker running the single-process sweep (hhbench.runner.sweep) on its shard of the plan.

shards   the plan dealt into shards by estimated cost (pure)
lock     the run lock (one sweep writes a run) and the shard locks (one worker writes a shard)
merge    the workers' shard files folded into rows.jsonl and env.json; a dead worker's point becomes an error row
worker   one shard measured in this process
local    worker processes on this machine, one per GPU, watched until they finish
cluster  submitit: a SLURM job array, or its local executor
run      the launch as `hhbench sweep --gpus/--launcher` does it
"""
