"""Fine-tuning jobs inside the running server, on the base it already serves (OpenAI's API shape).

    files.py      uploaded JSONL training files: validated row by row at upload, size-capped
    state.py      SQLite under --data-dir: files, jobs, events, checkpoints (survives restarts)
    jobs.py       a job request -> its TrainConfig ("auto" hyperparameters), the OpenAI job object
    slices.py     one job's Trainer on the resident DecoderModel, stepped a slice at a time
    scheduler.py  the engine loop's background hook: one job at a time, --train-share of engine
                  time while requests wait, all of it when idle; success, failure, cancel
    service.py    the operations both front ends call (runtime/server/http/finetune.py,
                  runtime/server/training_servicer.py): thin adapters over it, nothing more

Threads: API calls (any thread) only write SQLite and set flags; everything that touches the
model (building the adapter, training steps, exporting, cancelling) runs on the engine thread,
between engine steps, so a serving step never overlaps a training step.
"""
