"""Where this process runs: the cluster environment (torchrun, SLURM, a plain process), SLURM
nodelists, the process group and its session, preemption signals, a failed rank's recorded
cause, and the CPU threads a rank may use. The bottom layer with errors, storage and observe's
logs: it imports nothing above it."""
