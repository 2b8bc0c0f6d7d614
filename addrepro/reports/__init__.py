"""Reports: plots and tables of a job or a sweep, drawn from the run folders alone."""
