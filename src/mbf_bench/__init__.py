"""mbf_bench: the benchmark of the MBF paper's experiments against the usual optimizers."""
