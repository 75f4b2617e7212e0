"""Where collections live: paths and fsspec URLs (`btfast.io.fs`), WebDataset tar shards (`btfast.io.shards`,
`btfast.io.tar`) and reading the next shard while this one is decoded (`btfast.io.prefetch`)."""
