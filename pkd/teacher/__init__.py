"""Stage 1 input: prompts, the D_w/D_p/D_s split, the teacher clients (online and Batch API) with
their request body and cost guard, and the teacher-sample folder's writer and reader."""
