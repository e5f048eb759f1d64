"""What the model is fed: the batch arithmetic (`plan`), samplers and loaders (`loading`),
batches and the loss's counting (`batches`), building datasets and loaders from a recipe
(`builders`), streamed data dealt to ranks (`streaming`), and the data-against-model checks
(`fit`). The datasets and collate functions a recipe names live in launcher.datasets and
launcher.collate, where recipes name them."""
