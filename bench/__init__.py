"""mandate's benchmarks, run by hand from the repository root: `python -m bench` lists them,
`python -m bench NAME [--help]` runs one (bench/README.md). Never part of `make test`."""
