"""State checkpoints and run directories: atomic step directories with a COMPLETE marker
(`step_dirs`), the Stateful checkpointer (`checkpointer`), DCP shards (`sharded_state`) read
without unpickling anything but DCP's types (`dcp_safe`), and the run directory's layout, lock
and policy (`rundir`)."""
