"""Built-in datasets. Those the tests and the quickstart use need no download."""
