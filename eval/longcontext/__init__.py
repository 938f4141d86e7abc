"""Long-context evaluation: a synthetic needle-in-a-haystack retrieval test
(`needle`) and LongBench-style tasks from local files (`longbench`, with
`text_metrics`)."""
