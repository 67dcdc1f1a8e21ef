"""
The machinery of train_gpt2.py: what a learner may skip on a first reading, one module per topic.
train_gpt2.py tells the story (the model, the data, the training loop) and calls these by names that
say what happens; prepare.py and hellaswag.py use them too. Nothing here imports a script.

    files.py           one-line errors, atomic writes, a full disk said as such, sizes for people
    console.py         print0 and the lines a run prints (the step line, the model, the data, ...)
    command_line.py    the flags from TrainConfig, recipes (@configs/NAME.args), settings checks
    tokens.py          GPT-2's tokenizer offline, a text file's tokens, token shards and their manifest
    corpus.py          a local corpus's documents for prepare.py (.txt, .jsonl, .parquet), and its fingerprint
    fineweb.py         FineWeb-Edu streamed from the hub for prepare.py: resumable, retried, one line when it fails
    shard_folder.py    prepare.py's folder of shards: a killed run's continued, a finished one checked, its lock
    pretrained.py      OpenAI's GPT-2 through transformers, and our model exported back to it
    hub.py             the Hugging Face hub out of reach: its cache only, said at once
    hardware.py        device, precision and each device's quirks (memory, kernels, compile)
    loss.py            the loss without the logits: lm_head and cross-entropy a chunk of rows at a time
    recompute.py       activation checkpointing: which blocks run again in backward, and what each keeps
    speed.py           model FLOPs per second and MFU against the GPUs' bf16 peaks
    checkpoints.py     checkpoint files: written atomically, read safely, checked
    random_streams.py  every random stream a checkpoint holds (Python, NumPy, torch, CUDA, sampling)
    stopping.py        stop signals in every process at once, and a diverged loss
    run_log.py         log.jsonl, progress.png and Weights & Biases
    samples.py         the samples a run prints, and how every run ends (samples, export, last line)
    sharding.py        FSDP2 (--fsdp, --cpu_offload), and the full state dicts that make checkpoints one file
    memory.py          the memory a run needs, said at its start; the peak it used; out-of-memory in one line
    hellaswag_eval.py  HellaSwag: the items, their scoring, the reference accuracies
"""
