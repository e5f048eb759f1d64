"""What a run tells its user: logging (`logs`), metrics sinks (`metrics`: JSONL, console,
progress bar, TensorBoard), wandb (`wandb_log`), the profiler (`profiling`), the heartbeat of
long phases (`heartbeat`) and start-up marks (`startup`). logs, heartbeat and startup sit in
the bottom layer (the cluster code logs); metrics and wandb_log read the recipe."""
