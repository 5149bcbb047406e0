"""Run folders: file names, atomic writers, and the resumable record store and job runner."""
