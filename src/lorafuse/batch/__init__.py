"""Many jobs, and one merge split in many: ``lorafuse batch MANIFEST`` (manifest.py, runner.py) runs the jobs of a
manifest on an executor (executors.py: local processes or Ray tasks), skipping those already done (resume.py);
``lorafuse merge --workers N / --executor ray`` writes each output shard in a task of its own (shard_merge.py).
"""
