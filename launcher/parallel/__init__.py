"""How a model is spread over ranks: activation checkpointing and DDP (`wrap`), FSDP2/HSDP
(`sharding`), gradient norms and clipping (`gradients`), memory per rank and the activation
checkpointing auto-fit (`memory`), sizes no machine holds (`sizes`), autocast (`precision`)."""
