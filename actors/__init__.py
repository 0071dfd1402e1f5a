"""The work of each stage, as plain callable classes that know nothing about Ray.

- ``actors.preprocess.PreprocessRows``: CPU stage (decode media, build prompt, count tokens).
- ``actors.generate.GenerateRows``: GPU stage (one vLLM engine, batched generation).
"""
