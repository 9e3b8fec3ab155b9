"""The second holder of every uffd, and the journal a restarted daemon resumes from."""
