/*
 * What one message each way between two processes on one CPU costs, by the
 * kind of channel: a Unix stream socketpair (hearth's channel to an instance
 * until 2026-12-03, still the VMs' and the Runtime API runtimes'), a pair of
 * pipes (the process backend's Node.js instances since), and a Unix seqpacket
 * socketpair. Both processes are pinned to CPU 0, so each round trip is two
 * writes, two reads and two context switches, as a request and its answer
 * between hearth's worker and an instance on its core. Wall time per round
 * trip, three passes each, alternating.
 *
 *   gcc -O2 perf/channel-pingpong.c -o /tmp/pingpong && /tmp/pingpong
 */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 200000
#define MESSAGE 300 /* about a trivial request's INVOKE frame */

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

/* Microseconds per round trip: this process writes on `a_tx` and reads on
 * `a_rx`; a child echoes from `b_rx` to `b_tx`. */
static double round_trip_us(int a_tx, int a_rx, int b_tx, int b_rx) {
    char buf[512];
    memset(buf, 'x', sizeof buf);
    pid_t child = fork();
    if (child == 0) {
        for (int i = 0; i < ROUNDS; i++)
            if (read(b_rx, buf, sizeof buf) <= 0 || write(b_tx, buf, MESSAGE) != MESSAGE) _exit(1);
        _exit(0);
    }
    double t0 = now_ns();
    for (int i = 0; i < ROUNDS; i++)
        if (write(a_tx, buf, MESSAGE) != MESSAGE || read(a_rx, buf, sizeof buf) <= 0) return -1;
    double us = (now_ns() - t0) / ROUNDS / 1000;
    waitpid(child, NULL, 0);
    return us;
}

int main(void) {
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    CPU_SET(0, &cpus);
    if (sched_setaffinity(0, sizeof cpus, &cpus) != 0) perror("sched_setaffinity (CPU 0)");
    for (int pass = 1; pass <= 3; pass++) {
        int s[2], q[2], down[2], up[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, s) || socketpair(AF_UNIX, SOCK_SEQPACKET, 0, q) ||
            pipe(down) || pipe(up)) {
            perror("channel");
            return 1;
        }
        printf("pass %d: unix stream %6.2f us   pipe pair %6.2f us   unix seqpacket %6.2f us\n", pass,
               round_trip_us(s[0], s[0], s[1], s[1]), round_trip_us(down[1], up[0], up[1], down[0]),
               round_trip_us(q[0], q[0], q[1], q[1]));
        for (int i = 0; i < 2; i++) {
            close(s[i]);
            close(q[i]);
            close(down[i]);
            close(up[i]);
        }
    }
    return 0;
}
