"""The recipe: its schema (pydantic models, defaults, units), reading YAML with key=value
overrides, translating validation errors into one line naming the key, and `_component_`
instantiation and signature checks. Imports only errors, storage-free helpers and checkpoint.rundir
(a recipe knows its run directory's layout)."""
