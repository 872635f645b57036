// Service Bus namespace (Entra ID only) and the transactions queue.
// Roles, all scoped to the queue: the app identity may send and receive; the
// scaler identity gets Data Owner because KEDA reads the queue's runtime
// properties, which needs the Manage right.

param location string
param name string

@allowed([
  'Standard'
  'Premium'
])
param sku string

param queueName string

@minValue(1)
@maxValue(10)
param queueMaxDeliveryCount int

@minValue(5)
@maxValue(300)
param queueLockDurationSecs int

@description('ISO 8601 duration, e.g. PT10M.')
param queueDuplicateDetectionWindow string

param appPrincipalId string
param scalerPrincipalId string

@description('Log Analytics workspace receiving the namespace\'s logs and metrics.')
param logAnalyticsWorkspaceId string

// Built-in roles: Azure Service Bus Data Sender, Data Receiver, Data Owner.
var dataSenderRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39')
var dataReceiverRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0')
var dataOwnerRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '090c5cfd-751d-490a-894a-3ce6f1109419')

// Premium needs a capacity (messaging units); Standard must not have one.
var skuSettings = {
  Standard: {
    name: 'Standard'
    tier: 'Standard'
  }
  Premium: {
    name: 'Premium'
    tier: 'Premium'
    capacity: 1
  }
}

resource namespace 'Microsoft.ServiceBus/namespaces@2026-01-01' = {
  name: name
  location: location
  sku: skuSettings[sku]
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

// Keep these settings in step with infra/servicebus-emulator/Config.json
// (tests/deploy/check_deploy.py compares them).
resource queue 'Microsoft.ServiceBus/namespaces/queues@2026-01-01' = {
  parent: namespace
  name: queueName
  properties: {
    maxDeliveryCount: queueMaxDeliveryCount
    lockDuration: 'PT${queueLockDurationSecs}S'
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: queueDuplicateDetectionWindow
    deadLetteringOnMessageExpiration: true
    defaultMessageTimeToLive: 'P14D'
    requiresSession: false
    enableBatchedOperations: true
  }
}

resource appSends 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, appPrincipalId, dataSenderRoleId)
  scope: queue
  properties: {
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: dataSenderRoleId
  }
}

resource appReceives 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, appPrincipalId, dataReceiverRoleId)
  scope: queue
  properties: {
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: dataReceiverRoleId
  }
}

resource scalerReadsQueueLength 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(queue.id, scalerPrincipalId, dataOwnerRoleId)
  scope: queue
  properties: {
    principalId: scalerPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: dataOwnerRoleId
  }
}

// Operational and runtime audit logs, and the metrics the dead-letter alert and
// the workbook read (ActiveMessages, DeadletteredMessages, ...).
resource namespaceDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: namespace
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output namespaceId string = namespace.id
output namespaceName string = namespace.name
// e.g. sb-rtpd-xyz.servicebus.windows.net (serviceBusEndpoint is https://<fqdn>:443/).
output namespaceFqdn string = split(replace(namespace.properties.serviceBusEndpoint, 'https://', ''), ':')[0]
output queueName string = queue.name
