/*
 * What the Runtime API hop's primitives cost on this machine, in CPU time of the
 * calling thread (so the figures do not depend on the load): a 300-byte message over
 * TCP loopback (write, then read on the other end, same thread, TCP_NODELAY; the write
 * runs the receiving side's TCP stack in its softirq), the same over a Unix stream
 * socket (hearth's frame channel), and a poll over 6 fds and an epoll_wait that find
 * nothing ready.
 * Context switches are measured separately with `perf bench sched pipe`.
 *
 *   gcc -O2 perf/runtime-api-primitives.c -o /tmp/rapi-primitives && /tmp/rapi-primitives
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 50000

static double cpu_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

/* Mean CPU microseconds of writing 300 bytes to `tx` and reading them from `rx`. */
static double exchange_us(int tx, int rx) {
    char buf[512];
    memset(buf, 'x', sizeof buf);
    double t0 = cpu_ns();
    for (int i = 0; i < ROUNDS; i++) {
        if (write(tx, buf, 300) != 300 || read(rx, buf, sizeof buf) <= 0) return -1;
    }
    return (cpu_ns() - t0) / ROUNDS / 1000;
}

int main(void) {
    int one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 1) ||
        getsockname(l, (struct sockaddr *)&a, &len)) {
        perror("listen");
        return 1;
    }
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (struct sockaddr *)&a, sizeof a)) {
        perror("connect");
        return 1;
    }
    int s = accept(l, NULL, NULL);
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    printf("TCP loopback, 300 B written and read:  %6.2f us\n", exchange_us(c, s));

    int u[2];
    socketpair(AF_UNIX, SOCK_STREAM, 0, u);
    printf("Unix stream, 300 B written and read:   %6.2f us\n", exchange_us(u[0], u[1]));

    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN}, out[8];
    epoll_ctl(ep, EPOLL_CTL_ADD, u[1], &ev);
    double t0 = cpu_ns();
    for (int i = 0; i < ROUNDS; i++) epoll_wait(ep, out, 8, 0);
    printf("epoll_wait, nothing ready:             %6.2f us\n", (cpu_ns() - t0) / ROUNDS / 1000);
    struct pollfd p[6];
    for (int i = 0; i < 6; i++) p[i] = (struct pollfd){.fd = i % 2 ? u[1] : s, .events = POLLIN};
    t0 = cpu_ns();
    for (int i = 0; i < ROUNDS; i++) poll(p, 6, 0);
    printf("poll of 6 fds, nothing ready:          %6.2f us\n", (cpu_ns() - t0) / ROUNDS / 1000);
    return 0;
}
