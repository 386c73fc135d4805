"""`make loadtest`: the serving benchmark (docs/serving.md). Not a test and not part of the
installed package: it builds its models with `validation`'s tools and loads a real server
(`runtimes.serving`) with closed-loop clients on this machine."""
