"""asv benchmark suite of pydeform (configuration: ``asv_benchmarks/asv.conf.json``)."""
