// Alert rules an operator pages on:
//   dead letters   Service Bus metric DeadletteredMessages on the queue > 0
//   oldest pending rtpd's OTLP gauge rtpd_oldest_pending_age_seconds (App
//                  Insights customMetrics, sent by the metrics collector app)
//   5xx rate       share of credentialed transaction POSTs answered 5xx:
//                  rtpd's counter rtpd_ingest_requests{code, caller}
//                  (customMetrics) with caller == "credentialed", which
//                  counts load shedding's 503s to vendors with an API key
//                  too; outsiders (anonymous, forged or not yet verified
//                  signatures) can neither raise nor dilute it. Not the
//                  requests table: spans are sampled and lost while the
//                  agent is unreachable; the counter is exported whatever
//                  the sampling.
// Each notifies actionGroupId when one is given.

param location string
param prefix string
param serviceBusNamespaceId string
param queueName string
param appInsightsId string

@description('cloud_RoleName of the api in Application Insights (its OTEL_SERVICE_NAME).')
param apiRoleName string

@description('Existing action group to notify; empty: alerts show in the portal only.')
param actionGroupId string

param oldestPendingAlertSecs int
param http5xxAlertPercent int

var metricAlertActions = empty(actionGroupId) ? [] : [
  {
    actionGroupId: actionGroupId
  }
]
var logAlertActionGroups = empty(actionGroupId) ? [] : [
  actionGroupId
]

// Any dead-lettered message is a payment that needs an operator (docs/operations.md).
resource deadLetters 'Microsoft.Insights/metricAlerts@2018-03-01' = {
  name: '${prefix}-dead-letters'
  location: 'global'
  properties: {
    description: 'Messages in the dead-letter queue of ${queueName}: replay or resolve them (rtpd dlq).'
    severity: 1
    enabled: true
    scopes: [
      serviceBusNamespaceId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    targetResourceType: 'Microsoft.ServiceBus/namespaces'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: 'dead-lettered-messages'
          metricNamespace: 'Microsoft.ServiceBus/namespaces'
          metricName: 'DeadletteredMessages'
          dimensions: [
            {
              name: 'EntityName'
              operator: 'Include'
              values: [
                queueName
              ]
            }
          ]
          timeAggregation: 'Maximum'
          operator: 'GreaterThan'
          threshold: 0
        }
      ]
    }
    autoMitigate: true
    actions: metricAlertActions
  }
}

// Nothing acknowledged may wait forever: an old pending transaction means the
// processor or the reconciler is not keeping up (or not running).
resource oldestPending 'Microsoft.Insights/scheduledQueryRules@2022-08-01-preview' = {
  name: '${prefix}-oldest-pending-age'
  location: location
  kind: 'LogAlert'
  properties: {
    displayName: '${prefix}: oldest pending transaction older than ${oldestPendingAlertSecs} s'
    description: 'rtpd_oldest_pending_age_seconds above the threshold: check the processor, the queue and the reconciler.'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: 'customMetrics | where name == "rtpd_oldest_pending_age_seconds" | project timestamp, age_seconds = value'
          timeAggregation: 'Maximum'
          metricMeasureColumn: 'age_seconds'
          operator: 'GreaterThan'
          threshold: oldestPendingAlertSecs
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: logAlertActionGroups
    }
  }
}

// Ratio, not count, and only over windows with enough traffic to mean
// something. The metrics collector app turns the cumulative counter into
// deltas (cumulativetodelta), so value sums per window.
resource http5xx 'Microsoft.Insights/scheduledQueryRules@2022-08-01-preview' = {
  name: '${prefix}-api-5xx-rate'
  location: location
  kind: 'LogAlert'
  properties: {
    displayName: '${prefix}: more than ${http5xxAlertPercent}% of transaction POSTs answered 5xx'
    description: 'The api answers 5xx (503 = a backend is unavailable; vendors retry after Retry-After).'
    severity: 2
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    criteria: {
      allOf: [
        {
          query: 'customMetrics | where name == "rtpd_ingest_requests" and cloud_RoleName == "${apiRoleName}" | where tostring(customDimensions.caller) == "credentialed" | extend code = toint(customDimensions.code) | summarize total = sum(value), failed = sumif(value, code >= 500) | where total >= 20 | project percent_5xx = 100.0 * failed / total'
          timeAggregation: 'Maximum'
          metricMeasureColumn: 'percent_5xx'
          operator: 'GreaterThan'
          threshold: http5xxAlertPercent
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: logAlertActionGroups
    }
  }
}
