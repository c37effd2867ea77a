"""Benchmarks: MQAR recall against state size (`mqar`), prefill/decode throughput (`throughput`), and what their
result files record (`report`)."""
