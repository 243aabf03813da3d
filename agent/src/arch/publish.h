/* How a redirect is written, for sandbox-redirect.c only: the architecture's stores of
 * the protocol and its cache maintenance (the list: arch/arch.h). */
#ifndef PATCHBOX_ARCH_PUBLISH_H
#define PATCHBOX_ARCH_PUBLISH_H

#include "arch/arch.h"

#if defined(__x86_64__)
#include "arch/x86_64/publish.h"
#elif defined(__aarch64__)
#include "arch/aarch64/publish.h"
#endif

#endif
