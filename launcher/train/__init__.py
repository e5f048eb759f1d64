"""One run: its assembly from a recipe (`assemble`, with the model side in `setup`), N local
workers under torch's elastic agent (`local`), and the loop (`loop`, its typed state in
`loop_state`, a step's micro-batches in `window`, evaluation, the optimizer and scheduler in
`optim`), with what a checkpoint holds and which recipe may continue one (`resume`)."""
