// Where each record lives in the store. One cluster = one prefix.
export function keys(cluster: string) {
  const p = `/corral/${cluster}/`;
  return {
    prefix: p,
    config: `${p}config`,
    leader: `${p}leader`,
    term: `${p}term`,
    flags: `${p}cluster/flags`,
    node: (n: string) => `${p}nodes/${n}`,
    nodes: `${p}nodes/`,
    alive: (n: string) => `${p}alive/${n}`,
    alives: `${p}alive/`,
    nodeAdmin: (n: string) => `${p}nodeadmin/${n}`,
    nodeAdmins: `${p}nodeadmin/`,
    nodeStatus: (n: string) => `${p}nstate/${n}`,
    nodeStatuses: `${p}nstate/`,
    fence: (n: string) => `${p}fence/${n}`,
    fences: `${p}fence/`,
    resource: (id: string) => `${p}resources/${id}`,
    resources: `${p}resources/`,
    assign: (id: string) => `${p}assign/${id}`,
    assigns: `${p}assign/`,
    status: (n: string, id: string) => `${p}status/${n}/${id}`,
    statusesOf: (n: string) => `${p}status/${n}/`,
    statuses: `${p}status/`,
    cleanup: (id: string) => `${p}requests/cleanup/${id}`,
    cleanups: `${p}requests/cleanup/`,
    /** one-time console tickets by SHA-256 of the ticket (src/api/plugins/console.ts) */
    consoleTicket: (hash: string) => `${p}console/tickets/${hash}`,
    consoleTickets: `${p}console/tickets/`,
    /** where the API server run by a node's agent answers (for console forwarding) */
    apiEndpoint: (n: string) => `${p}api/${n}`,
    apiEndpoints: `${p}api/`,
    events: `${p}events/`,
    event: (atMs: number, by: string, seq: number) =>
      `${p}events/${String(atMs).padStart(15, '0')}-${by}-${String(seq).padStart(6, '0')}`,
  };
}
export type Keys = ReturnType<typeof keys>;
