"""The audit wing: the hash-chained decision trail (`trail`: record format, writer thread,
manifest, verification, query) and its command line (`cli`: `mandate audit`)."""
