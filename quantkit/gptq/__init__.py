"""GPTQ: quantize a checkpoint (`run.gptq_quantize`) and load GPTQ folders (`qlinear`).

algorithm.py  the math (reference and fast solvers, round-to-nearest), pure tensors
pack.py       codes <-> the int32 checkpoint layout every GPTQ loader reads
calibrate.py  layer streaming: capture, Hessians, true-sequential groups
artifact.py   what the output folder holds
qlinear.py    QuantLinear and load_gptq_model
naming.py     checkpoint tensor names vs the model's (transformers' key renames)
run.py        GPTQConfig and the command's pipeline
timing.py     per-phase seconds
"""
