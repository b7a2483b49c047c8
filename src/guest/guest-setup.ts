// Configuring a guest after it boots or is restored: one CONFIGURE carrying everything the
// host decides about it (docs/agent-protocol.md, CONFIGURE), shaped to what its agent supports.

import { randomBytes } from 'node:crypto';
import type { Volume } from '../vmm/volumes.js';
import { type AgentConnection, AgentError } from './agent-connection.js';
import type { ConfigureNet } from './protocol-messages.js';

/** A volume as the guest sees it: the same objects the host gave QEMU (src/vmm/volumes.ts). */
export type GuestVolume = Pick<Volume, 'tag' | 'guestPath' | 'readonly'>;

export interface GuestSetup {
  /** The guest's hostname; with it the guest also gets a fresh machine id and entropy. */
  hostname?: string;
  /** Shares to mount, from the list the host also gave QEMU. */
  volumes?: readonly GuestVolume[];
  /** Grow / to its disk: after a cold boot, or a restore onto a disk that may have grown. */
  growRoot?: boolean;
  /**
   * The guest's IPv4 network on its NIC (eth0): address/prefix, MTU, a default route via the
   * gateway and /etc/resolv.conf naming the DNS server. Only for a machine that has a NIC; its
   * agent must announce `net`, else configureGuest fails before sending anything.
   */
  net?: { address: string; prefix: number; gateway: string; mtu: number; dns: string };
}

/** The same shape as GuestSetup['net'], as the protocol names it. */
export type GuestNet = ConfigureNet;

/** How long an agent gets to answer CONFIGURE (a grow of several GiB under TCG is ~50 ms). */
const CONFIGURE_TIMEOUT_MS = 10_000;

/**
 * Sends the guest its configuration and the current time, and checks its volumes are mounted.
 * A protocol-1 agent (a machine booted before the upgrade, or a box disk made by an earlier
 * daemon) mounted its volumes at boot from `hutch.vol=` and grows / at every CONFIGURE, so it
 * gets only the fields it knows and its mounts are read back instead. `net` needs an agent that
 * announced it (EOPNOTSUPP otherwise, nothing sent). Rejects with an AgentError (the errno of
 * the step that failed, e.g. `net: SIOCADDRT default`) or an Error naming a volume not mounted.
 */
export async function configureGuest(agent: AgentConnection, setup: GuestSetup): Promise<void> {
  const volumes = setup.volumes ?? [];
  const byConfigure = agent.supports('configure-volumes');
  if (setup.net && !agent.supports('net'))
    // A machine with a NIC but an agent that cannot address it would be handed out offline.
    throw new AgentError(
      'EOPNOTSUPP',
      `the agent (protocol ${agent.features.version}) cannot configure the network; the machine's image needs a newer agent`,
      'configure',
    );
  await agent.configure(
    {
      ...(setup.hostname !== undefined
        ? { hostname: setup.hostname, machineId: randomBytes(16).toString('hex'), entropy: randomBytes(64) }
        : {}),
      ...(setup.growRoot ? { growRoot: true } : {}),
      ...(setup.net ? { net: setup.net } : {}),
      ...(byConfigure && volumes.length
        ? { volumes: volumes.map((v) => ({ tag: v.tag, path: v.guestPath, readonly: v.readonly })) }
        : {}),
      timeNs: BigInt(Date.now()) * 1_000_000n,
    },
    CONFIGURE_TIMEOUT_MS,
  );
  if (!byConfigure && volumes.length) await checkMounted(agent, volumes);
}

/**
 * A protocol-1 agent mounts volumes at boot and only logs a failure (a boot must not hang on
 * one): a machine is not handed out with a volume silently missing. The usual cause is a host
 * directory the unprivileged QEMU user cannot open.
 */
async function checkMounted(agent: AgentConnection, volumes: readonly GuestVolume[]): Promise<void> {
  const h = agent.readFile('/proc/self/mounts');
  const chunks: Buffer[] = [];
  for await (const c of h.stream) chunks.push(c as Buffer);
  await h.done;
  const mounted = new Set(
    Buffer.concat(chunks)
      .toString('utf8')
      .split('\n')
      .map((l) => l.split(' '))
      .filter((f) => f[2] === '9p')
      .map((f) =>
        (f[1] ?? '').replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(Number.parseInt(o, 8))),
      ),
  );
  for (const v of volumes)
    if (!mounted.has(v.guestPath))
      throw new Error(
        `volume ${v.tag} could not be mounted at ${v.guestPath}: the VM user must be able to read (and for a writable volume, write) its host directory`,
      );
}
