// SPDX-License-Identifier: Apache-2.0
/* The floor: an empty program on the raw tracepoint cap_capable (Linux 6.14,
 * commit d48da4d5ed7b). What any BPF program on this hook costs at least. */
int count(struct bpf_raw_tracepoint_args *ctx)
{
	return 0;
}
