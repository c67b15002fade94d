/*
 * _writer.c: a native thread that stores to random pages of a memory range until stopped,
 * for the background-checkpoint benchmark (bgckpt.py). It stands for the program's own
 * threads that run without the GIL (numpy, torch and other C extensions): it never needs the
 * interpreter, so what slows it down is the checkpoint itself, not the GIL.
 *
 * Each step stores one 8-byte word to a random word of a random page (xorshift64*). The
 * thread counts its stores; every 64 stores it reads the clock and keeps the longest gap
 * between two such readings: a stall (a pause, a page brought back) shows up there.
 * wr_window() hands out the counts since the previous call and starts a new window.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

typedef struct wr_writer wr_writer;

struct wr_writer {
    uint64_t *base;
    size_t words;
    uint64_t seed;
    pthread_t tid;
    atomic_int stop;
    atomic_uint_fast64_t stores;     /* since the window began */
    atomic_uint_fast64_t max_gap_ns; /* longest gap between clock readings in the window */
    atomic_int reset;                /* the reader asks the thread to restart its gap clock */
};

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void *run(void *arg)
{
    struct wr_writer *w = arg;
    uint64_t x = w->seed | 1, last = now_ns(), k = 0;
    while (!atomic_load_explicit(&w->stop, memory_order_relaxed)) {
        for (int i = 0; i < 64; i++) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            size_t idx = (size_t)((x * 0x2545F4914F6CDD1Dull) % w->words);
            w->base[idx] = ++k;
        }
        atomic_fetch_add_explicit(&w->stores, 64, memory_order_relaxed);
        uint64_t t = now_ns();
        if (atomic_exchange_explicit(&w->reset, 0, memory_order_relaxed))
            last = t;
        uint64_t gap = t - last;
        if (gap > atomic_load_explicit(&w->max_gap_ns, memory_order_relaxed))
            atomic_store_explicit(&w->max_gap_ns, gap, memory_order_relaxed);
        last = t;
    }
    return NULL;
}

wr_writer *wr_start(void *base, size_t nbytes, uint64_t seed)
{
    struct wr_writer *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->base = base;
    w->words = nbytes / 8;
    w->seed = seed;
    if (pthread_create(&w->tid, NULL, run, w)) {
        free(w);
        return NULL;
    }
    return w;
}

/* Stores and the longest gap since the previous call (or the start); a new window begins. */
void wr_window(wr_writer *w, uint64_t *stores, uint64_t *max_gap_ns)
{
    *stores = atomic_exchange(&w->stores, 0);
    *max_gap_ns = atomic_exchange(&w->max_gap_ns, 0);
    atomic_store(&w->reset, 1);
}

void wr_stop(wr_writer *w)
{
    atomic_store(&w->stop, 1);
    pthread_join(w->tid, NULL);
    free(w);
}
